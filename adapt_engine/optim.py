"""AdamW that survives pruning, with an optional free saliency tap on the training gradients.

Pruning shrinks parameters in place (same ``nn.Parameter`` objects, smaller ``.data``) and slices
``exp_avg``/``exp_avg_sq`` with the same indices (``surgery.apply_plan(..., optimizer=opt)``). That only
works with an optimizer that keeps nothing shaped like the old parameters besides that per-parameter
state: torch's fused and foreach AdamW regroup tensors on every step, and so does the Triton path
here (its chunk table is keyed by the current numels). The step counters are 0-d tensors and are kept,
so bias correction and the learning-rate schedule simply continue.

Backends:
  * ``triton``       — ``kernels.adamw`` multi-tensor kernel (CUDA; the default there when triton is installed)
  * ``torch-fused``  — ``torch.optim.AdamW(fused=True)`` (CPU, CUDA, XPU, MPS in torch ≥ 2.4)
  * ``torch-foreach`` — ``torch.optim.AdamW(foreach=True)``
  * ``auto``         — the first of those the parameters' device supports.

Saliency tap: :meth:`AdamW.track_saliency` registers, per parameter, one or more (group-score vector, pruned
dimension, group size) targets — a projection weight feeds two when stem channels are scored: its head or MLP
channel along one dimension, the hidden channels along the other. Right before each update the optimizer
adds ``Σ_group |w ⊙ g|`` (the first-order Taylor score Adapt-Pruner uses) from the *training* gradient, so the
next prune needs no separate backward pass over calibration data. Under DDP the gradients are already
all-reduced at that point, so every rank accumulates identical scores.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from .args import BACKENDS
from .kernels import group_saliency
from .kernels.adamw import AdamWHyper, AdamWTensors
from .kernels.dispatch import triton_available

try:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:
    _get_fused_kernels_supported_devices = None



def _fused_devices() -> list[str]:
    if _get_fused_kernels_supported_devices is None:  # older torch: fused AdamW was CUDA-only
        return ["cuda"]
    return list(_get_fused_kernels_supported_devices())


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device`` (a clear error if it cannot run there)."""
    if backend not in BACKENDS:
        raise ValueError(f"optimizer backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "torch-fused" if device.type in _fused_devices() else "torch-foreach"
    # TRITON_INTERPRET=1 runs the kernel on CPU tensors (tests); otherwise it needs CUDA.
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "triton" and not ((device.type == "cuda" or interpret) and triton_available()):
        raise ValueError(
            f"--optimizer triton needs CUDA parameters and the triton package, got device {device}; "
            "use --optimizer auto (picks torch's fused AdamW off-GPU)"
        )
    if backend == "torch-fused" and device.type not in _fused_devices():
        raise ValueError(
            f"torch {torch.__version__} has no fused AdamW for {device.type}; use --optimizer torch-foreach"
        )
    return backend


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose state is safe to slice in place, with selectable fused backends."""

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 2e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        backend: str = "auto",
    ):
        params = list(params)
        first = params[0]["params"][0] if params and isinstance(params[0], dict) else (params[0] if params else None)
        if first is None:
            raise ValueError("AdamW got an empty parameter list")
        self.backend = resolve_backend(backend, first.device)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            fused=True if self.backend == "torch-fused" else None,
            foreach=True if self.backend == "torch-foreach" else (False if self.backend == "triton" else None),
        )
        self._saliency: dict[nn.Parameter, list[tuple[torch.Tensor, int, int]]] = {}

    # -- saliency tap -------------------------------------------------------------------------------
    def track_saliency(self, targets: dict[nn.Parameter, list[tuple[torch.Tensor, int, int]]]) -> None:
        """Accumulate ``Σ_group |w ⊙ g|`` into ``out`` for each ``param → [(out, dim, group_size), ...]`` every
        step."""
        for p, entries in targets.items():
            for out, dim, group_size in entries:
                if p.shape[dim] != out.numel() * group_size:
                    raise ValueError(
                        f"saliency target of a param shaped {tuple(p.shape)} has {out.numel()} groups of "
                        f"{group_size} along dim {dim}; re-register targets after every prune"
                    )
        self._saliency = {p: list(entries) for p, entries in targets.items()}

    def clear_saliency(self) -> None:
        """Stop accumulating saliency."""
        self._saliency = {}

    @torch.no_grad()
    def _accumulate_saliency(self) -> None:
        for p, entries in self._saliency.items():
            if p.grad is None:
                continue
            for out, dim, group_size in entries:  # biases (1-D) take the same kernel path as importance.py's
                group_saliency(p.detach(), p.grad, dim, group_size=group_size, metric="taylor", out=out)

    # -- step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update (after adding this step's gradient saliency to any tracked scores)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._accumulate_saliency()
        if self.backend != "triton":
            super().step()
            return loss
        from .kernels.adamw_triton import adamw_step_triton  # triton is optional: imported when used

        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("the Triton AdamW backend supports neither amsgrad nor maximize")
            beta1, beta2 = group["betas"]
            # Parameters that skipped steps (no grad) have other counters: one launch per counter value.
            by_step: dict[int, tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:  # same layout as torch's AdamW so state_dicts move between backends
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                lists = by_step.setdefault(int(state["step"].item()), ([], [], [], []))
                for lst, t in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                    lst.append(t)
            lr = float(group["lr"])
            for step, (ps, gs, ms, vs) in by_step.items():
                adamw_step_triton(AdamWTensors(ps, gs, ms, vs), step,
                                  AdamWHyper(lr, beta1, beta2, group["eps"], group["weight_decay"]))
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only (norm weights and biases are not decayed); tied weights listed once."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8, backend: str = "auto",
) -> AdamW:
    """A prune-safe AdamW over a model's trainable parameters."""
    return AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                 backend=backend)
