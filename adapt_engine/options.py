"""The ``--output`` check run before any model is loaded: writable, nothing destroyed, room on the disk
(the setting groups themselves are declared in :mod:`adapt_engine.args`)."""

from __future__ import annotations

from pathlib import Path

from .fsio import preflight_output
from .models import estimate_model_bytes


def check_output(path: str | Path, *, overwrite: bool, model: str | None, dtype: str = "float32",
                 flag: str = "--output") -> Path:
    """Before any model is loaded: ``path`` can be written, and writing it destroys neither a non-empty folder
    (without --overwrite) nor the input model (a local ``model`` is protected); the disk must have room for
    the model at ``dtype`` (estimated from file headers; a mistyped model path is named here too).
    Returns the absolute path."""
    protect = [model] if model and Path(model).expanduser().exists() else []
    need = estimate_model_bytes(model, dtype) or 0
    return preflight_output(path, overwrite=overwrite, protect=protect, need_bytes=need, flag=flag)
