"""The --output check run before any model is loaded."""

import shutil
from collections import namedtuple

import pytest

from adapt_engine.errors import AdaptEngineError, OutputPathError
from adapt_engine.options import check_output


def test_check_output_needs_room_for_the_model(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1 << 20))
    with pytest.raises(OutputPathError, match="GiB free"):
        check_output(tmp_path / "out", overwrite=False, model=None, dtype="float32")
    with pytest.raises(AdaptEngineError, match="no such file or folder"):
        check_output(tmp_path / "out", overwrite=False, model=str(tmp_path / "typo_dir"))  # named before any load
