"""Public kernel entry points; the one place that picks a backend by device.

- CUDA tensors: Triton kernels (when triton is installed), else the torch reference.
- CPU tensors: C++ kernels built just in time (kernels.cpu_extension), else — only when
  ADAPT_ENGINE_DISABLE_CPP=1 — the torch reference. A failed build raises CppBuildError.
- Any other device: the torch reference.

The AdamW step has no C++ kernel: off CUDA it is the torch reference (``optim.AdamW`` uses torch's own
fused CPU AdamW there instead).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache

import torch

from .adamw import AdamWHyper, AdamWTensors, adamw_step_reference
from .cpu_extension import load_cpu_kernels
from .gather import gather_channels_with, gather_inplace_reference
from .linear_ce import ce_rows_torch, run_linear_cross_entropy
from .saliency import (
    METRIC_IDS,
    SaliencyArgs,
    accumulate_saliency_reference,
    check_saliency_args,
    run_saliency,
)

BACKENDS = ("triton", "cpp", "torch")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the optional triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def backend_for(tensor: torch.Tensor) -> str:
    """Name of the backend ('triton', 'cpp' or 'torch') that runs the kernels for this tensor."""
    if tensor.device.type == "cuda":
        return "triton" if triton_available() else "torch"
    if tensor.device.type == "cpu":
        return "cpp" if load_cpu_kernels() is not None else "torch"
    return "torch"


def _saliency_cpp(args: SaliencyArgs, out: torch.Tensor) -> None:
    load_cpu_kernels().group_saliency(
        args.weight, args.grad, args.fisher, out, args.dim, args.group_size, METRIC_IDS[args.metric],
        args.fisher_scale,
    )


def _saliency_triton(args: SaliencyArgs, out: torch.Tensor) -> None:
    from .saliency_triton import accumulate_saliency_triton

    accumulate_saliency_triton(args, out)


_SALIENCY = {"cpp": _saliency_cpp, "triton": _saliency_triton, "torch": accumulate_saliency_reference}


def group_saliency(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    dim: int,
    group_size: int = 1,
    metric: str = "taylor",
    out: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    *,
    fisher_scale: float = 1.0,
) -> torch.Tensor:
    """Float32 per-group saliency of weight along dim (0: rows, 1: columns), added into out if given."""
    args = check_saliency_args(weight, grad, dim, group_size, metric, out, fisher, fisher_scale)
    return run_saliency(args, out, _SALIENCY[backend_for(args.weight)])


def _gather_cpp(t: torch.Tensor, idx: torch.Tensor, dim: int) -> None:
    load_cpu_kernels().gather_inplace(t, idx, dim)


def _gather_triton(t: torch.Tensor, idx: torch.Tensor, dim: int) -> None:
    from .gather_triton import gather_inplace_triton

    gather_inplace_triton(t, idx, dim)


_GATHER = {"cpp": _gather_cpp, "triton": _gather_triton, "torch": gather_inplace_reference}


def _gather_one(t: torch.Tensor, idx: torch.Tensor, dim: int) -> None:
    _GATHER[backend_for(t)](t, idx, dim)


def _gather_all_with(ops):
    """All-CPU lists: one C++ call validates and compacts every tensor (False: rejected, unchanged)."""

    def gather_all(layouts, idx: torch.Tensor) -> bool:
        return ops.gather_channels([t for t, _, _ in layouts], idx, [d for _, d, _ in layouts]) == 0

    return gather_all


def gather_channels(
    tensors: Sequence[torch.Tensor],
    index: torch.Tensor | Sequence[int],
    dim: int,
    *,
    shrink: bool = False,
) -> list[torch.Tensor]:
    """Compact each tensor in place to the sorted unique index along dim; return new-shape views."""
    if isinstance(tensors, torch.Tensor):
        return gather_channels_with(tensors, index, dim, shrink, _gather_one)  # raises the clear error
    if not isinstance(tensors, (list, tuple)):
        tensors = list(tensors)  # a generator is read once, here
    if tensors and all(isinstance(t, torch.Tensor) and t.is_cpu for t in tensors):
        ops = load_cpu_kernels()
        if ops is not None:
            return gather_channels_with(tensors, index, dim, shrink, _gather_one, _gather_all_with(ops))
    return gather_channels_with(tensors, index, dim, shrink, _gather_one)


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Multi-tensor AdamW update in place: the Triton kernel for CUDA tensors when triton is installed, else torch."""
    fn = adamw_step_reference
    if params and backend_for(params[0]) == "triton":
        from .adamw_triton import adamw_step_triton

        fn = adamw_step_triton
    fn(AdamWTensors(params, grads, exp_avgs, exp_avg_sqs), step, AdamWHyper(lr, beta1, beta2, eps, weight_decay))
# -- fused linear + cross-entropy (kernels/linear_ce.py) -------------------------------------------
def _ce_rows_for(tensor: torch.Tensor):
    """Row kernel of the fused loss: Triton on CUDA when installed, else plain torch (CPU: see docs/kernels.md)."""
    if tensor.device.type == "cuda" and triton_available():
        from .linear_ce_triton import ce_rows_triton

        return ce_rows_triton
    return ce_rows_torch


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk: int | None = None,
) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight), targets) in token chunks, never holding all the logits."""
    return run_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, chunk, _ce_rows_for(hidden))

