"""Fused linear + cross-entropy vs the plain ``F.cross_entropy(F.linear(h, W))``: time and peak memory.

SmolLM2-135M's LM head (vocab 49,152 × hidden 576) over one calibration batch of 32 × 64 tokens,
forward + backward, fp32 and bf16. "frozen" is calibration (gradient wrt the hidden states only);
"trained" is Adapt-Accel's step (the LM head gets its gradient too). In each round the plain and
fused versions run back to back on the same inputs; extra_info gives ``speedup_vs_plain`` and
``peak_extra_mb`` for both, measured in a fresh child process as the growth of its peak RSS
over one forward + backward after the inputs exist (a process's peak RSS never goes down).

    pytest benchmarks/bench_linear_ce.py --benchmark-only
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from adapt_engine.kernels import linear_cross_entropy

TOKENS, VOCAB, HIDDEN = 32 * 64, 49152, 576
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("plain", "fused")
CASES = [(d, head, impl) for d in DTYPES for head in ("frozen", "trained") for impl in IMPLS]


def plain_loss(h, w, t):
    """What transformers' causal-LM loss does: full logits, upcast to fp32, cross-entropy."""
    return F.cross_entropy(F.linear(h, w).float(), t)


def fused_loss(h, w, t):
    """The chunked fused kernel."""
    return linear_cross_entropy(h, w, t)


def inputs(dtype: torch.dtype, trained: bool):
    """Hidden states, LM head and targets of one calibration batch."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.04).to(dtype).requires_grad_(trained)
    t = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    return h, w, t


_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
import bench_linear_ce as b
h, w, t = b.inputs(getattr(torch, sys.argv[2]), sys.argv[3] == "trained")
fn = b.plain_loss if sys.argv[4] == "plain" else b.fused_loss
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn(h, w, t).backward()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""


def peak_extra_mb(dtype: str, head: str, impl: str) -> float:
    """Peak-RSS growth of one forward + backward in a fresh process, in MB."""
    from pathlib import Path

    name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    out = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent), name, head, impl],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype, head, impl", CASES, ids=[f"{d}-{h}-{i}" for d, h, i in CASES])
def test_linear_cross_entropy(benchmark, bench_record, bench_lookup, dtype, head, impl):
    h, w, t = inputs(DTYPES[dtype], head == "trained")
    fn = plain_loss if impl == "plain" else fused_loss

    def step():
        h.grad = None
        w.grad = None
        fn(h, w, t).backward()

    case = f"linear_ce {TOKENS}x{VOCAB}x{HIDDEN} {dtype} {head}"
    benchmark.group = case
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    info = {"peak_extra_mb": peak_extra_mb(dtype, head, impl)}
    if impl == "fused":
        row = bench_lookup(f"{case} plain")
        if row:
            info["speedup_vs_plain"] = row["best_ms"] / benchmark.stats.stats.min / 1e3
    bench_record(benchmark, f"{case} {impl}", None, **info)


if __name__ == "__main__":  # quick look without pytest: peak extra memory of each case
    print(json.dumps({f"{d} {h} {i}": peak_extra_mb(d, h, i) for d, h, i in CASES}, indent=1))
