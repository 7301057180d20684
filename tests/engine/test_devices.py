"""``--device`` names checked against what this machine has."""

import pytest
import torch

from adapt_engine.devices import resolve_device
from adapt_engine.errors import UsageError


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    cases = (("bogus", "not a torch device"), ("meta", "only cpu and cuda"), ("cuda:-1", "not a torch device"))
    for bad, needle in cases:
        with pytest.raises(UsageError, match=needle):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU is visible; use --device cpu"):
            resolve_device("cuda")
