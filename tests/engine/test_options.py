"""Shared setting groups: device and dtype checks, (the training-data fingerprint is tested in test_data)."""

import pytest
import torch

from adapt_engine.errors import AdaptEngineError, UsageError
from adapt_engine.options import check_dtype, resolve_device


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


def test_dtypes():
    check_dtype("bf16")
    with pytest.raises(UsageError, match="--dtype must be one of"):
        check_dtype("int8")


def test_check_output_needs_room_for_the_model(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from adapt_engine.errors import OutputPathError
    from adapt_engine.options import check_output

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1 << 20))
    with pytest.raises(OutputPathError, match="GiB free"):
        check_output(tmp_path / "out", overwrite=False, model=None, dtype="float32")
    with pytest.raises(AdaptEngineError, match="no such file or folder"):
        check_output(tmp_path / "out", overwrite=False, model=str(tmp_path / "typo_dir"))  # named before any load
