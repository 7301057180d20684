"""One calibration pass (forward + backward + lstsq statistics) in float32 and under bf16 autocast.

A random Llama shaped like SmolLM2-135M but with 4 decoder layers (hidden 576, 9 query / 3 KV heads, MLP 1536,
vocab 49152), 64 calibration windows in batches of 32 and micro-batches of 4 (`prune`'s defaults), with the
Gram statistics of ``--compensate lstsq`` gathered in the same pass. Rows:

* ``float32``: the pass as ``--calib-dtype float32`` runs it.
* ``bfloat16``: as ``--calib-dtype bfloat16`` (and ``auto`` on CPUs with AMX or AVX512-BF16) runs it: one autocast
  region per batch, and SDPA's math kernel for windows of at most ``MATH_ATTENTION_MAX_SEQ`` tokens.
* ``bfloat16 flash``: the same with the flash kernel forced, to show what the math-kernel rule buys.

``vs_float32`` is each row's best time over the float32 row's, in the same run, at the same window length.

    pytest benchmarks/bench_calib_pass.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from adapt_engine import importance
from adapt_engine.adapters import DecoderAdapter
from adapt_engine.compensation import InputStatistics
from adapt_engine.importance import calibration_pass

MODES = ("float32", "bfloat16", "bfloat16 flash")  # float32 first: the others divide by it
SEQ_LENS = (64, 192)
ROUNDS = 3


@pytest.fixture(scope="module")
def adapter(smollm2_shaped_llama):
    return DecoderAdapter(smollm2_shaped_llama)


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("mode", MODES)
def test_calibration_pass(benchmark, bench_record, bench_lookup, adapter, monkeypatch, mode, seq_len):
    calib = torch.randint(0, 49152, (64, seq_len), generator=torch.Generator().manual_seed(0))
    if mode == "bfloat16 flash":
        monkeypatch.setattr(importance, "MATH_ATTENTION_MAX_SEQ", 0)

    def one_pass():
        stats = InputStatistics(adapter, "lstsq")
        calibration_pass(adapter, calib, 32, "cosine", "taylor", calib_dtype=mode.split()[0], micro_batch_size=4,
                         observers=(stats,))

    benchmark.group = f"calibration pass, 4-layer SmolLM2-shaped Llama, 64x{seq_len} tokens"
    benchmark.pedantic(one_pass, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    info = {}
    reference = bench_lookup(f"calib pass float32 seq{seq_len}")
    if mode != "float32" and reference:
        info["vs_float32"] = benchmark.stats.stats.min * 1e3 / reference["best_ms"]
    bench_record(benchmark, f"calib pass {mode} seq{seq_len}", None, **info)
