"""Names of the floating-point dtypes the engine accepts (``--dtype``), and the default-dtype rule.

Default rule (both loaders, ``models.load_model`` and ``saving.load_pruned``): a model is loaded in
float32 unless a dtype is asked for, whatever dtype its files store. Pruning scores and training
need float32 math; ``--dtype bf16``/``fp16`` opt into low-precision weights.
"""

from __future__ import annotations

import torch

from .args import DTYPE_NAMES
from .errors import UsageError

DEFAULT_DTYPE = torch.float32
DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """torch dtype from a name like 'float32' / 'bf16'; None is the default (float32)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise UsageError(f"dtype {name} is not supported; use one of {', '.join(DTYPES)}")
        return name
    if name is None:
        return DEFAULT_DTYPE
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]
