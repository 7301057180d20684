"""gather_channels: in-place compaction vs its torch reference, index_select, and a plain copy.

Each round restores the full tensor in place (in setup, not timed). "copy" is a
plain contiguous copy of the kept bytes into a preallocated buffer: the floor for moving the
data. Extra memory is measured as the peak-RSS increase of one call (/proc/self/status VmHWM
after resetting it); by construction the C++ path allocates at most its 512 KiB bounce buffer.

"x4" cases compact four same-shape tensors in one call, as surgery does for a parameter with its
gradient and AdamW exp_avg / exp_avg_sq during recovery training; their copy baseline is one
contiguous copy of all kept bytes. They run cold only (14 MB of operands is not cache-resident).

The small (SmolLM2) shapes run "hot" (operands left in cache by the setup; the copy baseline
repeats on the same cache-resident buffers) and "cold" (caches flushed before every round,
as for a real model's weights during surgery). The 8B shapes exceed the cache: always cold.

    pytest benchmarks/bench_gather.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
from adapt_engine.kernels import backend_for, gather_channels, gather_channels_reference

# (shape, dim, pattern): MLP channels removed at random (rows of gate/up, columns of down),
# attention heads of 64 removed (rows of q, columns of o), at 50 % kept.
CASES_BASE = [
    ((1536, 576), 0, "random", 1),
    ((576, 1536), 1, "random", 1),
    ((576, 576), 1, "heads", 1),
    ((1536, 576), 0, "random", 4),
    ((576, 1536), 1, "random", 4),
    ((14336, 4096), 0, "random", 1),
    ((4096, 14336), 1, "random", 1),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("copy", "index_select", "reference", "kernel")
CASES = [
    (s, d, p, n, dt, c, i)
    for s, d, p, n in CASES_BASE
    for dt in DTYPES
    for c in (("dram",) if s[0] * s[1] > (1 << 24) else ("cold",) if n > 1 else ("hot", "cold"))
    for i in IMPLS
]


def _index(n: int, pattern: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if pattern == "heads":
        heads = torch.randperm(n // 64, generator=gen)[: n // 128].sort().values
        return (heads[:, None] * 64 + torch.arange(64)).flatten()
    return torch.randperm(n, generator=gen)[: n // 2].sort().values


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra_bytes(fn) -> int | None:
    """Peak resident memory added while fn runs (Linux: resets VmHWM through clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status("VmRSS")
        fn()
        return max(0, _status("VmHWM") - base)
    except OSError:
        return None


@pytest.mark.parametrize("shape, dim, pattern, count, dtype, cache, impl", CASES,
                         ids=[f"{s[0]}x{s[1]}-dim{d}-{p}-x{n}-{dt}-{c}-{i}" for s, d, p, n, dt, c, i in CASES])
def test_gather_channels(benchmark, bench_record, bench_lookup, evict_caches, shape, dim, pattern, count, dtype,
                         cache, impl):
    gen = torch.Generator().manual_seed(0)
    srcs = [torch.randn(shape, generator=gen).to(DTYPES[dtype]) for _ in range(count)]
    idx = _index(shape[dim], pattern)
    kept = torch.cat([src.index_select(dim, idx).flatten() for src in srcs])
    kept_bytes = kept.nbytes
    # Cold rounds: operands from DRAM, code warm (as in a surgery loop): evict, then run the
    # same call on a small stand-in so the timed call does not also pay for cold Python/dispatch.
    small_src = srcs[0][:64].clone() if dim == 0 else srcs[0][:, :64].clone()
    small_idx = torch.arange(0, 64, 2)
    if impl == "copy":
        dst = torch.empty_like(kept)
        dst.copy_(kept)  # touch the pages once
        small_kept, small_dst = kept[:4096].clone(), torch.empty(4096, dtype=kept.dtype)

        def setup():
            if cache == "cold":
                evict_caches()
                small_dst.copy_(small_kept)
            return (), {}

        def run():
            dst.copy_(kept)
    else:
        del kept
        ops = {
            "index_select": lambda ts, ix: [t.index_select(dim, ix) for t in ts],
            "reference": lambda ts, ix: gather_channels_reference(ts, ix, dim),
            "kernel": lambda ts, ix: gather_channels(ts, ix, dim),
        }
        op = lambda ts: ops[impl](ts, idx)  # noqa: E731
        # Long-lived tensors restored before every round, as a model's parameters are: fresh
        # clones per round would add first-touch TLB misses that the copy baseline never pays.
        work = [src.clone() for src in srcs]
        small_work = [small_src.clone() for _ in srcs]
        op(work)  # warm-up: JIT load, allocator pools

        def setup():
            for w, src in zip(work, srcs):
                w.copy_(src)
            if cache == "cold":
                evict_caches()
                for w in small_work:
                    w.copy_(small_src)
                ops[impl](small_work, small_idx)
            return (work,), {}

        def run(ts):
            op(ts)

    suffix = "" if count == 1 else f" x{count}"
    case = f"gather {shape[0]}x{shape[1]} dim{dim} {pattern}{suffix} {dtype} {cache}"
    benchmark.group = case
    rounds = int(max(3, min(30, 4e9 // max(1, count * srcs[0].nbytes))))
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    info = {"backend": backend_for(srcs[0]) if impl == "kernel" else "torch", "kept_mb": kept_bytes / 1e6}
    if impl != "copy":
        fresh = [src.clone() for src in srcs]
        extra = peak_extra_bytes(lambda: op(fresh))
        if extra is not None:
            info["peak_extra_mb"] = extra / 1e6
        copy_row = bench_lookup(f"{case} copy")
        if copy_row:
            info["time_vs_copy"] = benchmark.stats.stats.min * 1e3 / copy_row["best_ms"]
    if impl == "kernel":
        for base in ("index_select", "reference"):
            row = bench_lookup(f"{case} {base}")
            if row:
                info[f"speedup_vs_{base}"] = row["best_ms"] / benchmark.stats.stats.min / 1e3
    # Bytes moved: the kept data read once and written once.
    bench_record(benchmark, f"{case} {impl}", 2 * kept_bytes, **info)
