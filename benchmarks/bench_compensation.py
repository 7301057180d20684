"""Cost of ``--compensate lstsq`` per pruning sub-step, as a ratio to the same sub-step without it.

A random Llama shaped like SmolLM2-135M but with 4 decoder layers (hidden 576, 9 query / 3 KV heads,
MLP 1536, vocab 49152), 64 calibration windows of 64 tokens in micro-batches of 32, one Adapt-Pruner
sub-step removing 2.25 % of the prunable weights (one of T=10 sub-steps to 22.5 %). ``lstsq`` adds the
Gram accumulation in the calibration forward pass (XᵀX of every down_proj/o_proj input) and the
per-layer ridge solves; ``overhead_vs_none`` is its time over the ``none`` row of the same run.

    pytest benchmarks/bench_compensation.py --benchmark-only
"""

from __future__ import annotations

import copy

import pytest
import torch

from adapt_engine.pruner import AdaptPruner, PruneSettings

METHODS = ("none", "lstsq")  # "none" first: lstsq divides by it
ROUNDS = 3


@pytest.mark.parametrize("method", METHODS)
def test_prune_sub_step(benchmark, bench_record, bench_lookup, smollm2_shaped_llama, method):
    calib = torch.randint(0, 49152, (64, 64), generator=torch.Generator().manual_seed(0))

    def setup():
        model = copy.deepcopy(smollm2_shaped_llama)
        pruner = AdaptPruner(model, PruneSettings(steps=1, compensate=method), calib)
        target = pruner.original_total - int(round(0.0225 * pruner.original_prunable))
        return (pruner, target), {}

    benchmark.group = "prune sub-step, 4-layer SmolLM2-shaped Llama, 64x64 calibration tokens"
    benchmark.pedantic(lambda pruner, target: pruner.prune_to(target), setup=setup, rounds=ROUNDS, iterations=1,
                       warmup_rounds=1)
    info = {}
    if method == "lstsq":
        row = bench_lookup("prune sub-step none")
        if row:
            info["overhead_vs_none"] = benchmark.stats.stats.min * 1e3 / row["best_ms"]
    bench_record(benchmark, f"prune sub-step {method}", None, **info)
