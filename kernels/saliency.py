"""Group saliency: argument checks, the plain-torch reference, and the shared public semantics.

Scores of a weight W (with its gradient G) along ``dim``: dim=0 scores rows (q/k/v/gate/up
projections, reducing over columns), dim=1 scores columns (o/down projections). Consecutive
``group_size`` rows/columns form one group (head_dim for attention heads). Metrics, summed over
the elements of a group:

- ``taylor``     Σ|w·g|                   (first-order Taylor, the default)
- ``vectorize``  |Σ w·g|                  (abs of the group's signed sum)
- ``magnitude``  Σ|w|                     (grad may be None)
- ``param_mix``  Σ|w·g − ½·w²·F·s|        (F: running Fisher sum, s: ``fisher_scale``)

Accumulation contract (``out=``): the scores of one call are ADDED into ``out``. For
``vectorize`` the absolute value belongs to the whole coupled group, so ``out=`` receives the
SIGNED sums Σ w·g; take the absolute value once after the last matrix with
:func:`finalize_saliency` (a no-op for the other metrics). Without ``out`` the result is final.

``param_mix`` Fisher accumulator: ``fisher`` is a float32 tensor shaped like the weight,
updated in place (F += g²) before the element's score is computed. F is the raw running sum
over calls; ``fisher_scale`` multiplies it in the score, so pass ``fisher_scale=1/N`` to use
the mean over N gradients (LLM-Pruner's Σg²/N), or 1.0 to use the sum as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METRIC_IDS = {"taylor": 0, "vectorize": 1, "magnitude": 2, "param_mix": 3}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The reference path materialises fp32 copies of at most this many elements at a time.
REFERENCE_CHUNK_ELEMS = 1 << 18


@dataclass
class SaliencyArgs:
    """Checked, canonical arguments: 2-D tensors, dim in {0, 1}, one float32 accumulator."""

    weight: torch.Tensor
    grad: torch.Tensor | None
    fisher: torch.Tensor | None
    dim: int
    group_size: int
    metric: str
    fisher_scale: float
    n_groups: int


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"group_saliency: {name} has dtype {t.dtype}; use float32, bfloat16 or float16")


def check_saliency_args(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    dim: int,
    group_size: int,
    metric: str,
    out: torch.Tensor | None,
    fisher: torch.Tensor | None,
    fisher_scale: float,
) -> SaliencyArgs:
    """Validate group_saliency arguments (clear errors) and return canonical 2-D views."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"group_saliency: weight must be a torch.Tensor, got {type(weight).__name__}")
    if metric not in METRIC_IDS:
        raise ValueError(f"group_saliency: unknown metric {metric!r}; choose one of {sorted(METRIC_IDS)}")
    _check_float("weight", weight)
    if weight.dim() not in (1, 2):
        raise ValueError(
            f"group_saliency: weight must be 1-D (a bias) or 2-D (a Linear weight), got shape "
            f"{tuple(weight.shape)}"
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"group_saliency: dim={dim!r} is invalid for a {weight.dim()}-D weight; use 0 or 1")
    dim = dim % weight.dim()
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_saliency: group_size must be a positive int, got {group_size!r}")
    n = weight.shape[dim]
    if n % group_size:
        raise ValueError(
            f"group_saliency: weight.shape[{dim}]={n} is not divisible by group_size={group_size}; "
            "pass the head_dim of this projection (or 1 for single channels)"
        )
    if grad is None:
        if metric != "magnitude":
            raise ValueError(
                f"group_saliency: metric {metric!r} needs grad; only 'magnitude' accepts grad=None"
            )
    elif metric != "magnitude":
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"group_saliency: grad must be a torch.Tensor or None, got {type(grad).__name__}")
        _check_float("grad", grad)
        if grad.shape != weight.shape:
            raise ValueError(
                f"group_saliency: grad shape {tuple(grad.shape)} differs from weight shape "
                f"{tuple(weight.shape)}"
            )
        if grad.device != weight.device:
            raise ValueError(f"group_saliency: grad is on {grad.device} but weight is on {weight.device}")
    if metric == "param_mix":
        if fisher is None:
            raise ValueError(
                "group_saliency: metric 'param_mix' needs fisher= (a float32 tensor shaped like weight, "
                "zero-initialised, updated in place with g² on every call)"
            )
        if not isinstance(fisher, torch.Tensor) or fisher.dtype != torch.float32:
            raise TypeError("group_saliency: fisher must be a float32 tensor")
        if fisher.shape != weight.shape or fisher.device != weight.device:
            raise ValueError(
                f"group_saliency: fisher must match weight in shape and device, got {tuple(fisher.shape)} on "
                f"{fisher.device} for weight {tuple(weight.shape)} on {weight.device}"
            )
    elif fisher is not None:
        raise ValueError(f"group_saliency: fisher= is only used by metric 'param_mix', not {metric!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() != 1:
            raise TypeError("group_saliency: out must be a 1-D float32 tensor")
        if out.numel() != n // group_size or out.device != weight.device:
            raise ValueError(
                f"group_saliency: out must hold {n // group_size} scores on {weight.device}, got "
                f"{out.numel()} on {out.device}"
            )
    w, g, f = weight.detach(), None if metric == "magnitude" else grad.detach(), fisher
    if w.dim() == 1:  # a bias: one "row" per element
        w = w.unsqueeze(1)
        g = None if g is None else g.unsqueeze(1)
        f = None if f is None else f.unsqueeze(1)
    return SaliencyArgs(w, g, f, dim, group_size, metric, float(fisher_scale), n // group_size)


def finalize_saliency(scores: torch.Tensor, metric: str) -> torch.Tensor:
    """Turn scores accumulated with out= into final scores (abs for 'vectorize'); returns scores."""
    if metric not in METRIC_IDS:
        raise ValueError(f"finalize_saliency: unknown metric {metric!r}; choose one of {sorted(METRIC_IDS)}")
    if metric == "vectorize":
        scores.abs_()
    return scores


def _term(w: torch.Tensor, g: torch.Tensor | None, f: torch.Tensor | None, metric: str, scale: float):
    if metric == "magnitude":
        return w.abs()
    if metric == "taylor":
        return (w * g).abs()
    if metric == "vectorize":
        return w * g
    return (w * g - (0.5 * scale) * w * w * f).abs()


@torch.no_grad()
def accumulate_saliency_reference(args: SaliencyArgs, out: torch.Tensor) -> None:
    """Plain-torch backend: add raw group scores into out, in chunks of rows (bounded temporaries)."""
    w, g, f = args.weight, args.grad, args.fisher
    rows, cols = w.shape
    per_keep = torch.zeros(w.shape[args.dim], dtype=torch.float32, device=w.device)
    step = max(1, REFERENCE_CHUNK_ELEMS // max(1, cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        wc = w[r0:r1].float()
        gc = None if g is None else g[r0:r1].float()
        fc = None
        if f is not None:
            f[r0:r1] += gc * gc
            fc = f[r0:r1]
        v = _term(wc, gc, fc, args.metric, args.fisher_scale)
        if args.dim == 0:
            per_keep[r0:r1] += v.sum(1)
        else:
            per_keep += v.sum(0)
    out += per_keep.view(-1, args.group_size).sum(1)


def group_saliency_reference(
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
    """Plain-torch group_saliency with the same semantics (see the module docstring)."""
    args = check_saliency_args(weight, grad, dim, group_size, metric, out, fisher, fisher_scale)
    return run_saliency(args, out, accumulate_saliency_reference)


def run_saliency(args: SaliencyArgs, out: torch.Tensor | None, accumulate) -> torch.Tensor:
    """Apply the out=/finalisation contract around a backend's accumulate(args, out) function."""
    if out is None:
        scores = torch.zeros(args.n_groups, dtype=torch.float32, device=args.weight.device)
        accumulate(args, scores)
        return finalize_saliency(scores, args.metric)
    if out.is_contiguous():
        accumulate(args, out)
    else:
        tmp = torch.zeros(args.n_groups, dtype=torch.float32, device=out.device)
        accumulate(args, tmp)
        out += tmp
    return out
