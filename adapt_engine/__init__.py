"""adapt-engine: adaptive structured pruning of decoder LLMs into smaller dense models.

Heavy modules (transformers) are imported lazily so that ``adapt_engine.kernels`` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_pruned", "save_pruned", "load_model", "__version__"]


def __getattr__(name: str):
    if name in ("load_pruned", "save_pruned"):
        from . import saving

        return getattr(saving, name)
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'adapt_engine' has no attribute '{name}'")
