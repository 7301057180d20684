"""Fused kernels for structured pruning and training: group saliency, in-place channel gathering, AdamW,
and the LM loss fused with its linear head (never the full logits).

Importable without transformers; triton is imported only when a CUDA tensor needs it.
Backends: Triton (CUDA), C++ built just in time (CPU), plain torch (reference / fallback).
"""

import sys


def _stand_aside_for_the_installed_kernels() -> bool:
    """Imported as top-level ``kernels``, load the installed ``kernels`` distribution in this folder's place.

    A checkout's root on ``sys.path`` (``python -m ...`` run from it) makes this folder shadow Hugging Face's
    ``kernels`` package, which transformers (5.25 and later) imports by name; ours is ``adapt_engine.kernels``.
    Without that distribution, this folder loads as before (older transformers probe it and find no version)."""
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", others)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement hands back whatever sys.modules holds at the end
    spec.loader.exec_module(module)
    return True


# As top-level ``kernels`` with Hugging Face's package installed, that package has taken this module's place.
if __name__ != "kernels" or not _stand_aside_for_the_installed_kernels():
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
