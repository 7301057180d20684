"""Latency of a width-pruned model against its dense original: measured speedup vs the ideal FLOP ratio.

A mid-size random Llama (SmolLM2-like proportions) and a copy with half of its query heads and MLP
channels physically removed are run interleaved in the same rounds (greedy generate, KV cache, fixed
length). The benchmark time is one round (dense + pruned); ``extra_info`` and the session summary carry
both medians, the measured speedup (median of per-round ratios), the ideal FLOP ratio and their quotient.

    pytest benchmarks/bench_latency.py --benchmark-only
"""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from adapt_engine.bench import time_generate  # noqa: E402
from adapt_engine.flops import decode_flops, model_shape, prefill_flops  # noqa: E402

CONFIG = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=4,
              num_hidden_layers=4, vocab_size=8192, max_position_embeddings=4096)
ROUNDS = 5
# (phase, batch, prompt, new tokens): prefill is compute-bound, decode is dominated by per-step overhead.
CASES = [("prefill", 4, 256, 2), ("decode", 1, 64, 32)]


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight.contiguous()
    return lin


def _halve_widths(model: nn.Module) -> nn.Module:
    """Keep the first half of the query heads of every KV group and the first half of the MLP channels."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        d = attn.head_dim
        n_kv = attn.k_proj.out_features // d
        n_rep = attn.q_proj.out_features // d // n_kv
        heads = [g * n_rep + j for g in range(n_kv) for j in range(n_rep // 2)]
        rows = torch.tensor([h * d + i for h in heads for i in range(d)])
        attn.q_proj, attn.o_proj = _linear(attn.q_proj.weight[rows]), _linear(attn.o_proj.weight[:, rows])
        attn.num_key_value_groups = n_rep // 2
        keep = mlp.gate_proj.out_features // 2
        mlp.gate_proj, mlp.up_proj = _linear(mlp.gate_proj.weight[:keep]), _linear(mlp.up_proj.weight[:keep])
        mlp.down_proj = _linear(mlp.down_proj.weight[:, :keep])
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    dense = transformers.LlamaForCausalLM(config).eval()
    pruned = transformers.LlamaForCausalLM(config).eval()
    pruned.load_state_dict(dense.state_dict())
    return {"dense": dense, "pruned": _halve_widths(pruned)}


@pytest.mark.parametrize(("phase", "batch", "prompt", "new_tokens"), CASES, ids=[c[0] for c in CASES])
def test_pruned_speedup_vs_ideal(benchmark, bench_record, models, phase, batch, prompt, new_tokens):
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, prompt), generator=torch.Generator().manual_seed(0))
    which = 0 if phase == "prefill" else 1
    samples: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)

    def one_round():
        # Rotate who goes first so that drifting machine load hits both models alike.
        start = len(samples["dense"]) % len(names)
        for name in names[start:] + names[:start]:
            samples[name].append(time_generate(models[name], ids, new_tokens)[which])

    one_round()  # warm-up
    for values in samples.values():
        values.clear()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)

    shapes = {name: model_shape(m) for name, m in models.items()}
    if phase == "prefill":
        flops = {name: prefill_flops(s, batch, prompt) for name, s in shapes.items()}
    else:
        flops = {name: decode_flops(s, batch, prompt, new_tokens) for name, s in shapes.items()}
    speedup = statistics.median(d / p for d, p in zip(samples["dense"], samples["pruned"], strict=True))
    ideal = flops["dense"] / flops["pruned"]
    # bench_record (benchmarks/conftest.py) puts these in extra_info and in the end-of-session summary.
    bench_record(
        benchmark, f"latency {phase} b{batch}x{prompt}+{new_tokens}", None,
        torch_threads=torch.get_num_threads(),
        dense_ms=statistics.median(samples["dense"]), pruned_ms=statistics.median(samples["pruned"]),
        speedup=speedup, ideal_flop_ratio=ideal, speedup_over_ideal=speedup / ideal,
    )
    assert ideal > 1.0
