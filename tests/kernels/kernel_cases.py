"""Shared inputs and float64 ground truths for the kernel tests (imported by the test modules)."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Inputs of every dtype convert exactly to fp32 and every backend computes and accumulates in
# fp32, so what differs is rounding of the products (none for 8/11-bit mantissas) and summation
# order; the error is bounded relative to the group's Σ|term| (not to the result, which
# 'vectorize' may cancel to ~0).
SALIENCY_RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
LAYOUTS = ("contiguous", "transposed", "sliced", "offset")
INDEX_MODES = (
    "all", "one", "none", "half", "almost_all", "runs", "first", "last", "every_other", "first_dropped"
)


def make_matrix(shape: tuple[int, ...], dtype: torch.dtype, layout: str, gen: torch.Generator):
    """A tensor of the given logical shape, stored contiguously, transposed, strided or offset."""
    def rand(*s):
        return torch.randn(*s, generator=gen).to(dtype)

    if len(shape) == 1 or layout == "contiguous":
        return rand(*shape)
    rows, cols = shape
    if layout == "transposed":
        return rand(cols, rows).t()
    if layout == "sliced":  # no unit stride on either axis
        return rand(rows, 2 * cols)[:, ::2]
    if layout == "offset":  # unit stride, padded rows, non-zero storage offset
        return rand(rows + 2, cols + 5)[1 : rows + 1, 3 : cols + 3]
    raise ValueError(layout)


def saliency_truth(w, g, f, dim: int, group_size: int, metric: str, fisher_scale: float = 1.0):
    """(scores, scale): float64 scores and the per-group operand magnitude that scales tolerances."""
    w = w.double()
    g = None if g is None else g.double()
    if w.dim() == 1:
        w = w.unsqueeze(1)
        g = None if g is None else g.unsqueeze(1)
        f = None if f is None else f.unsqueeze(1)
    if metric == "magnitude":
        t = w.abs()
    elif metric == "taylor":
        t = (w * g).abs()
    elif metric == "vectorize":
        t = w * g
    else:
        fn = f.double() + g * g
        t = (w * g - 0.5 * fisher_scale * w * w * fn).abs()
        # The difference may cancel: fp32 rounding is relative to its operands, not to it.
        magnitude = (w * g).abs() + (0.5 * fisher_scale * w * w * fn).abs()
    if metric != "param_mix":
        magnitude = t.abs()
    per = t.sum(1 - dim).view(-1, group_size).sum(1)
    scale = magnitude.sum(1 - dim).view(-1, group_size).sum(1)
    if metric == "vectorize":
        per = per.abs()
    return per, scale


def assert_scores_close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """Compare against the float64 truth with a dtype tolerance relative to each group's Σ|term|."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    tol = SALIENCY_RTOL[dtype] * (scale + 1e-30) + 1e-30
    err = (got.double() - want).abs()
    bad = err > tol
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {got.numel()} groups off; worst err {float(err.max()):.3g} "
        f"vs tol {float(tol.min()):.3g}"
    )


def random_index(n: int, mode: str, gen: torch.Generator) -> list[int]:
    """A sorted unique index of kept channels out of n, by pattern."""
    if mode == "all":
        return list(range(n))
    if mode == "none":
        return []
    if mode == "one":
        return [int(torch.randint(n, (1,), generator=gen))]
    if mode == "half":
        return sorted(torch.randperm(n, generator=gen)[: max(1, n // 2)].tolist())
    if mode == "almost_all":
        drop = int(torch.randint(n, (1,), generator=gen))
        return [i for i in range(n) if i != drop] or [0]
    if mode == "runs":  # whole heads of 4 kept or dropped
        keep = torch.rand((n + 3) // 4, generator=gen) < 0.6
        return [i for i in range(n) if keep[i // 4]] or [n - 1]
    if mode == "first":
        return list(range(max(1, n // 3)))
    if mode == "last":
        return list(range(n - max(1, n // 3), n))
    if mode == "every_other":
        return list(range(1, n, 2)) or [0]
    if mode == "first_dropped":
        return list(range(1, n)) or [0]
    raise ValueError(mode)


def fill(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random values of any dtype."""
    if dtype == torch.bool:
        return (torch.randint(0, 2, shape, generator=gen) > 0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype)
