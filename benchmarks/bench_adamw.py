"""AdamW step throughput: our prune-safe optimizer vs torch.optim.AdamW (foreach and fused), same params.

Parameters shaped like SmolLM2-135M (embedding 49152×576 and 4 decoder layers: q/o 576×576, k/v
192×576, gate/up 1536×576, down 576×1536, two norms each), float32 as in mixed-precision training.
Bytes moved per step = param, grad, exp_avg, exp_avg_sq read + param, exp_avg, exp_avg_sq written
(7 × 4 bytes per element). Rows:

* ``torch-foreach`` / ``torch-fused``: ``torch.optim.AdamW(foreach=True)`` / ``(fused=True)``
* ``ours``: ``adapt_engine.optim.AdamW`` with its automatic backend (Triton kernel on CUDA, torch's fused
  kernel on CPU), with ``speedup_vs_*`` ratios against the torch rows of the same run
* ``ours+saliency``: the same step also accumulating Taylor group scores |w·g| of every projection
  (what replaces a calibration backward pass before each prune); ``overhead_vs_ours`` is its cost ratio

    pytest benchmarks/bench_adamw.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapt_engine.optim import AdamW

HIDDEN, KV, MLP, VOCAB, LAYERS = 576, 192, 1536, 49152, 4
IMPLS = ("torch-foreach", "torch-fused", "ours", "ours+saliency")  # torch rows first: ours divides by them
ROUNDS = 10


def _shapes() -> list[tuple[tuple[int, ...], int, int]]:
    """(shape, saliency dim, group size) of every parameter; dim -1 = not a pruned projection."""
    shapes = [((VOCAB, HIDDEN), -1, 0)]
    for _ in range(LAYERS):
        shapes += [((HIDDEN, HIDDEN), 0, 64), ((KV, HIDDEN), 0, 64), ((KV, HIDDEN), 0, 64),
                   ((HIDDEN, HIDDEN), 1, 64), ((MLP, HIDDEN), 0, 1), ((MLP, HIDDEN), 0, 1),
                   ((HIDDEN, MLP), 1, 1), ((HIDDEN,), -1, 0), ((HIDDEN,), -1, 0)]
    return shapes


@pytest.fixture(scope="module")
def params():
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape, dim, gs in _shapes():
        p = nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        out.append((p, dim, gs))
    return out


def _optimizer(impl: str, ps: list[nn.Parameter]):
    kw = dict(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    if impl == "torch-foreach":
        return torch.optim.AdamW(ps, foreach=True, **kw)
    if impl == "torch-fused":
        return torch.optim.AdamW(ps, fused=True, **kw)
    return AdamW(ps, backend="auto", **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_adamw_step(benchmark, bench_record, bench_lookup, params, impl):
    ps = [p for p, _, _ in params]
    opt = _optimizer(impl, ps)
    if impl == "ours+saliency":
        opt.track_saliency({p: [(torch.zeros(p.shape[dim] // gs), dim, gs)] for p, dim, gs in params if dim >= 0})
    opt.step()  # creates the state (not timed)
    numel = sum(p.numel() for p in ps)
    nbytes = 7 * 4 * numel
    benchmark.group = f"adamw step {numel / 1e6:.1f}M fp32 params"
    benchmark.pedantic(opt.step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    info = {"backend": getattr(opt, "backend", impl), "params_m": numel / 1e6}
    if impl.startswith("ours"):
        for base in ("torch-foreach", "torch-fused"):
            row = bench_lookup(f"adamw {base}")
            if row:
                info[f"speedup_vs_{base}"] = row["best_ms"] / (benchmark.stats.stats.min * 1e3)
    if impl == "ours+saliency":
        row = bench_lookup("adamw ours")
        if row:
            info["overhead_vs_ours"] = benchmark.stats.stats.min * 1e3 / row["best_ms"]
    bench_record(benchmark, f"adamw {impl}", nbytes, **info)
