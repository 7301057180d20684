"""group_saliency throughput: the fused kernel vs its chunked torch reference vs naive torch.

Shapes are SmolLM2-135M projections (576×1536 up/gate as out×in = 1536×576, down = 576×1536)
and a Llama-3-8B MLP projection (4096×14336). Row scores (dim=0) and column scores (dim=1),
fp32 and bf16. Bytes moved = weight + grad (+ Fisher read and write for param_mix).

The small shapes run twice: "hot" repeats the call on cache-resident operands (a gradient
scored right after the backward produced it), "cold" flushes the caches before every round
(operands come from DRAM). The 8B shape is 4-8x the last-level cache, so it is always cold.

    pytest benchmarks/bench_saliency.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
from adapt_engine.kernels import backend_for, group_saliency, group_saliency_reference

SHAPES = ((1536, 576), (576, 1536), (4096, 14336))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# In this order: the kernel row divides by the others. "read" is torch.sum of weight and grad, the
# floor of any one-pass reader on the same operands in the same cache state.
IMPLS = ("read", "naive", "reference", "kernel")
LARGE = (4096, 14336)
CASES = [
    (shape, dtype, dim, metric, cache, impl)
    for shape in SHAPES
    for dtype in DTYPES
    for dim in (0, 1)
    for metric in (("taylor", "param_mix") if shape == LARGE else ("taylor",))
    for cache in (("dram",) if shape == LARGE else ("hot", "cold"))
    for impl in IMPLS
    if not (metric == "param_mix" and impl in ("naive", "read"))
]


def _rounds(nbytes: int, impl: str) -> int:
    # The naive path runs at ~1 GB/s: keep the largest shape to a few rounds.
    budget = 2e9 if impl == "naive" else 2e10
    return int(max(3, min(50, budget // max(1, nbytes))))


@pytest.fixture(scope="module")
def tensors():
    cache = {}

    def get(shape, dtype):
        key = (shape, dtype)
        if key not in cache:
            cache.clear()  # keep one pair alive: the 8B shape is 470 MB in fp32
            gen = torch.Generator().manual_seed(0)
            cache[key] = (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
        return cache[key]

    return get


def _call(impl: str, w: torch.Tensor, g: torch.Tensor, dim: int, metric: str, fisher):
    """The timed call of one implementation on (w, g)."""
    if impl == "read":
        return lambda: (w.sum(), g.sum())
    if impl == "naive":
        return lambda: (w * g).abs().sum(1 - dim)  # the baseline: two full temporaries
    if impl == "reference":
        return lambda: group_saliency_reference(w, g, dim, 1, metric, fisher=fisher)
    return lambda: group_saliency(w, g, dim, 1, metric, fisher=fisher)


@pytest.mark.parametrize("shape, dtype, dim, metric, cache, impl", CASES,
                         ids=[f"{s[0]}x{s[1]}-{d}-dim{m}-{me}-{c}-{i}" for s, d, m, me, c, i in CASES])
def test_group_saliency(benchmark, bench_record, bench_lookup, tensors, evict_caches, shape, dtype, dim, metric,
                        cache, impl):
    w, g = tensors(shape, DTYPES[dtype])
    fisher = torch.zeros(shape) if metric == "param_mix" else None
    nbytes = w.nbytes + g.nbytes + (2 * fisher.nbytes if fisher is not None else 0)
    fn = _call(impl, w, g, dim, metric, fisher)
    case = f"saliency {shape[0]}x{shape[1]} {dtype} dim{dim} {metric} {cache}"
    benchmark.group = case
    setup = None
    if cache == "cold":
        # Operands from DRAM, code warm (as in a pruning loop): evict, then run the same call on
        # small stand-ins (big enough to take the threaded path), so the timed call does not
        # also pay for cold Python and dispatch.
        tw, tg = (t[:64, :512].clone() if dim == 0 else t[:512, :64].clone() for t in (w, g))
        warm = _call(impl, tw, tg, dim, metric, None if fisher is None else torch.zeros(tw.shape))

        def setup():
            evict_caches()
            warm()

    rounds = _rounds(nbytes, impl) if cache != "cold" else min(20, _rounds(nbytes, impl))
    benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
    info = {"backend": backend_for(w) if impl == "kernel" else "torch"}
    if impl == "kernel":
        for base in ("naive", "reference"):
            row = bench_lookup(f"{case} {base}")
            if row:
                info[f"speedup_vs_{base}"] = row["best_ms"] / benchmark.stats.stats.min / 1e3
        row = bench_lookup(f"{case} read")
        if row:
            info["time_vs_read"] = benchmark.stats.stats.min * 1e3 / row["best_ms"]
    bench_record(benchmark, f"{case} {impl}", nbytes, **info)
