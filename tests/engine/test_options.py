"""Shared setting groups: device and dtype checks, and the training-data stamp a resume compares."""

import os

import pytest
import torch

from adapt_engine.errors import UsageError
from adapt_engine.options import check_dtype, data_stamp, resolve_device


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


def test_data_stamp_follows_content_not_mtime(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("alpha beta")
    first = data_stamp(str(f))
    os.utime(f, (1, 1))
    assert data_stamp(str(f)) == first
    f.write_text("alpha bet4")
    assert data_stamp(str(f))["sha256"] != first["sha256"]
    (tmp_path / "b.txt").write_text("more")
    folder = data_stamp(str(tmp_path))
    assert folder["files"] == 2 and folder["bytes"] == 14
    assert data_stamp(None) == {"spec": "pydoc"}
