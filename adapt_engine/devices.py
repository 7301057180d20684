"""The torch device a ``--device`` value names, checked against what this machine has."""

from __future__ import annotations

import torch

from .errors import UsageError


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
