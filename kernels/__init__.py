"""Fused kernels for structured pruning: group saliency and in-place channel gathering.

Importable without transformers; triton is imported only when a CUDA tensor needs it.
Backends: Triton (CUDA), C++ built just in time (CPU), plain torch (reference / fallback).
"""

from .cpu_extension import CppBuildError
from .dispatch import backend_for, gather_channels, group_saliency
from .gather import gather_channels_reference
from .saliency import finalize_saliency, group_saliency_reference

__all__ = [
    "CppBuildError",
    "backend_for",
    "finalize_saliency",
    "gather_channels",
    "gather_channels_reference",
    "group_saliency",
    "group_saliency_reference",
]
from .adamw import adamw_step, adamw_step_reference  # noqa: E402, F401 - fused AdamW (kernels/adamw.py)

# Fused linear + cross-entropy (kernels/linear_ce.py): the LM loss without the full logits.
from .dispatch import linear_cross_entropy  # noqa: E402, F401
from .linear_ce import linear_cross_entropy_reference, linear_cross_entropy_torch  # noqa: E402, F401
