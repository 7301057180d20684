"""Fused kernels for structured pruning and training: group saliency, in-place channel gathering, AdamW,
and the LM loss fused with its linear head (never the full logits).

Importable without transformers; triton is imported only when a CUDA tensor needs it.
Backends: Triton (CUDA), C++ built just in time (CPU), plain torch (reference / fallback).
"""

from .adamw import AdamWHyper, AdamWTensors, adamw_step_reference
from .cpu_extension import CppBuildError
from .dispatch import adamw_step, backend_for, gather_channels, group_saliency, linear_cross_entropy
from .gather import gather_channels_reference
from .linear_ce import (
    linear_cross_entropy_reference,
    linear_cross_entropy_torch,
    linear_cross_entropy_vocab_chunks,
)
from .saliency import finalize_saliency, group_saliency_reference

__all__ = [
    "CppBuildError",
    "AdamWHyper",
    "AdamWTensors",
    "adamw_step",
    "adamw_step_reference",
    "backend_for",
    "finalize_saliency",
    "gather_channels",
    "gather_channels_reference",
    "group_saliency",
    "group_saliency_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_cross_entropy_torch",
    "linear_cross_entropy_vocab_chunks",
]
