"""Tests of the latency benchmark and the analytic FLOP count (tiny random models, no timing assertions)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tiny_models import FAMILY_CASES, make_tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from adapt_engine import bench
from adapt_engine.bench import (
    BenchInputError,
    add_bench_arguments,
    benchmark_models,
    check_pruned_version,
    check_same_tokenizer,
    format_quick_speedup,
    quick_speedup,
    run_bench,
)
from adapt_engine.flops import (
    decode_flops,
    flops_breakdown,
    forward_flops_per_token,
    model_shape,
    prefill_flops,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=256, max_position_embeddings=2048)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls gain nothing from threads, and on a busy 2-core box a second thread only waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight.clone()
    return lin


def shrink_layer(model: nn.Module, index: int, q_per_kv: int, mlp: int) -> nn.Module:
    """Physically slice one layer: keep ``q_per_kv`` query heads in every KV group and ``mlp`` channels."""
    attn, mlp_mod = model.model.layers[index].self_attn, model.model.layers[index].mlp
    head_dim = attn.head_dim
    n_kv = attn.k_proj.out_features // head_dim
    n_rep = attn.q_proj.out_features // head_dim // n_kv
    heads = [g * n_rep + j for g in range(n_kv) for j in range(q_per_kv)]
    rows = torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)])
    attn.q_proj, attn.o_proj = _linear(attn.q_proj.weight[rows]), _linear(attn.o_proj.weight[:, rows])
    attn.num_key_value_groups = q_per_kv
    mlp_mod.gate_proj = _linear(mlp_mod.gate_proj.weight[:mlp])
    mlp_mod.up_proj = _linear(mlp_mod.up_proj.weight[:mlp])
    mlp_mod.down_proj = _linear(mlp_mod.down_proj.weight[:, :mlp])
    return model


def tiny_pruned(seed: int = 0) -> nn.Module:
    """Layer 0: 2 of 4 query heads, 64 of 128 channels; layer 1: 2 query heads, 32 channels."""
    return shrink_layer(shrink_layer(tiny_llama(seed), 0, 1, 64), 1, 1, 32)


def byte_tokenizer(reverse: bool = False, size: int = 256) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:size]
    if reverse:
        alphabet = alphabet[::-1]
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# -- FLOPs --------------------------------------------------------------------------------------------

# Hand count for TINY (hidden 64, head_dim 16, 4 q / 2 kv heads, MLP 128, vocab 256), multiply-adds per token:
# q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12288; gate, up 64x128 + down 128x64 = 24576; per layer 36864.
DENSE_LAYER_FLOPS = 2 * 36864
HEAD_FLOPS = 2 * 64 * 256
# Scores and values per context token: 2 * (q width 64 + o input 64) per layer.
DENSE_ATTN_PER_CTX = 2 * (64 + 64) * 2


def test_dense_flops_match_hand_count():
    shape = model_shape(tiny_llama())
    assert shape.linear_flops_per_token == 2 * DENSE_LAYER_FLOPS + HEAD_FLOPS == 180224
    assert shape.attention_flops_per_context_token == DENSE_ATTN_PER_CTX
    assert forward_flops_per_token(shape, 10) == 180224 + 10 * DENSE_ATTN_PER_CTX
    # Prefill of 8 tokens: contexts 1..8 sum to 36; LM head on the last position only.
    per_sequence = 2 * DENSE_LAYER_FLOPS * 8 + HEAD_FLOPS + DENSE_ATTN_PER_CTX * 36
    assert prefill_flops(shape, 2, 8) == 2 * per_sequence
    # 4 new tokens after a 8-token prompt: 3 cached steps with contexts 9, 10, 11.
    assert decode_flops(shape, 1, 8, 4) == 3 * 180224 + DENSE_ATTN_PER_CTX * 30
    assert shape.params == sum(p.numel() for p in tiny_llama().parameters())
    assert [layer.num_heads for layer in shape.layers] == [4, 4]


def test_pruned_flops_read_from_layer_shapes_not_config():
    pruned = tiny_pruned()
    shape = model_shape(pruned)
    # Layer 0: q/k/v/o all 64x32 (2 query heads, 2 kv heads) = 4 * 2048, MLP 3 * 64 * 64.
    layer0 = 4 * 2048 + 3 * 64 * 64
    # Layer 1: same attention, MLP 3 * 64 * 32.
    layer1 = 4 * 2048 + 3 * 64 * 32
    assert shape.linear_flops_per_token == 2 * (layer0 + layer1) + HEAD_FLOPS
    assert shape.attention_flops_per_context_token == 2 * (32 + 32) * 2
    assert [layer.num_heads for layer in shape.layers] == [2, 2]
    assert pruned.config.num_attention_heads == 4  # the config still says 4: the count must not use it
    dense = model_shape(tiny_llama())
    for ctx in (1, 100):
        assert forward_flops_per_token(shape, ctx) < forward_flops_per_token(dense, ctx)
    breakdown = flops_breakdown(shape, 7)
    assert breakdown["total"] == forward_flops_per_token(shape, 7)
    assert breakdown["layers"][1]["down_proj"] == 2 * 32 * 64


@pytest.mark.parametrize(("family", "gqa"), FAMILY_CASES)
def test_flops_of_every_family_count_each_linear_once(family, gqa):
    model = make_tiny_model(family, gqa=gqa)
    shape = model_shape(model)
    # Independent count: every nn.Linear of the model (biases, q/k norms and embeddings add no matmul FLOPs).
    assert shape.linear_flops_per_token == 2 * sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    assert shape.params == sum(p.numel() for p in model.parameters())
    check_pruned_version(model, make_tiny_model(family, gqa=gqa, seed=1))


def test_reloaded_pruned_output_is_accepted(tmp_path):
    from adapt_engine.saving import load_pruned, save_pruned

    pruned = tiny_pruned()
    reloaded = load_pruned(save_pruned(pruned, None, tmp_path / "pruned"))
    check_pruned_version(tiny_llama(), reloaded)
    assert model_shape(reloaded).linear_flops_per_token == model_shape(pruned).linear_flops_per_token


def test_shrunk_model_still_generates():
    ids = torch.tensor([[1, 2, 3]])
    out = tiny_pruned().generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


# -- benchmark ----------------------------------------------------------------------------------------


def _small_bench(**kwargs):
    defaults = dict(batch_sizes=(1,), prompt_lens=(8,), new_tokens=3, repeats=1, warmup=1)
    return benchmark_models({"dense": tiny_llama(), "pruned": tiny_pruned()}, byte_tokenizer(),
                            **{**defaults, **kwargs})


def test_benchmark_writes_table_json_and_png(tmp_path):
    result = _small_bench(batch_sizes=(1, 2))
    assert [(s["batch_size"], s["prompt_len"]) for s in result.settings] == [(1, 8), (2, 8)]
    for setting in result.settings:
        for name in ("dense", "pruned"):
            m = setting["models"][name]
            assert m["prefill_ms"]["median"] > 0 and m["decode_ms_per_token"]["median"] > 0
            assert m["prefill_ms"]["p20"] <= m["prefill_ms"]["median"] <= m["prefill_ms"]["p80"]
        s = setting["speedups"]["pruned"]
        assert s["ideal_prefill"] > 1 and s["ideal_decode"] > 1
        assert s["prefill_efficiency"] == pytest.approx(s["prefill"]["median"] / s["ideal_prefill"])
    assert "dense" not in result.settings[0]["speedups"]
    assert result.environment["torch_threads"] == 1 and result.environment["attention"]

    table = result.format_table()
    assert "prefill speedup" in table and "pruned" in table and "torch threads=1" in table

    json_path = result.write_json(tmp_path / "out" / "bench.json")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result.to_dict()))
    png = result.write_chart(tmp_path / "out" / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "chart.png"]


def test_runs_are_interleaved_and_speedup_is_median_of_paired_ratios(monkeypatch):
    calls = []
    fake = {"dense": [(10.0, 4.0), (12.0, 4.0), (30.0, 9.0)], "pruned": [(5.0, 2.0), (4.0, 2.0), (10.0, 3.0)]}

    def fake_generate(model, input_ids, attention_mask, gen_config, clock):
        name = "dense" if model is models["dense"] else "pruned"
        calls.append(name)
        timed = len([c for c in calls if c == name]) - 1  # the first call per model is the warm-up
        return fake[name][timed - 1] if timed >= 1 else (1.0, 1.0)

    models = {"dense": tiny_llama(), "pruned": tiny_pruned()}
    monkeypatch.setattr(bench, "_timed_generate", fake_generate)
    result = benchmark_models(models, None, batch_sizes=(1,), prompt_lens=(8,), new_tokens=3, repeats=3,
                              warmup=1)
    # Warm-up, then rounds whose starting model rotates.
    assert calls == ["dense", "pruned", "dense", "pruned", "pruned", "dense", "dense", "pruned"]
    s = result.settings[0]["speedups"]["pruned"]
    assert s["prefill"]["samples"] == [2.0, 3.0, 3.0] and s["prefill"]["median"] == 3.0
    assert s["decode"]["median"] == 2.0
    assert s["prefill_best"] == 10.0 / 4.0  # best run against best run, reported beside the median
    assert result.settings[0]["models"]["dense"]["prefill_ms"]["median"] == 12.0


def test_training_mode_is_restored():
    dense, pruned = tiny_llama().train(), tiny_pruned()
    benchmark_models({"dense": dense, "pruned": pruned}, batch_sizes=(1,), prompt_lens=(4,), new_tokens=2,
                     repeats=1, warmup=0)
    assert dense.training and not pruned.training


def test_attention_without_sdpa_falls_back_only_when_allowed():
    """Gemma 2 has no SDPA path: --attn auto (fallback eager) runs, an explicit sdpa is a clear error."""
    models = {"dense": make_tiny_model("gemma2", vocab=256), "same": make_tiny_model("gemma2", vocab=256)}
    kw = dict(batch_sizes=(1,), prompt_lens=(4,), new_tokens=2, repeats=1, warmup=0, attention="sdpa")
    result = benchmark_models(models, attention_fallback="eager", **kw)
    assert result.environment["attention"] == "eager"
    with pytest.raises(BenchInputError, match="cannot run --attn sdpa.*choose another --attn"):
        benchmark_models(models, **kw)


def test_quick_speedup_reports_measured_and_ideal():
    result = quick_speedup(tiny_llama(), tiny_pruned(), prompt_len=8, new_tokens=3, repeats=1)
    for key in ("prefill_speedup", "decode_speedup", "ideal_prefill_speedup", "ideal_decode_speedup"):
        assert result[key] > 0
    assert result["pruned_params"] < result["dense_params"]
    text = format_quick_speedup(result)
    assert "prefill" in text and "decode" in text and "ideal" in text


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda: tiny_llama(hidden_size=128, head_dim=16), "hidden size 128, wider"),
        (lambda: tiny_llama(vocab_size=300), "vocabulary size"),
        (lambda: tiny_llama(num_hidden_layers=3), "number of decoder layers"),
        (lambda: tiny_llama(intermediate_size=256), "wider than the dense"),
        (lambda: tiny_llama(head_dim=8), "attention head size"),
        (lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)), "qwen2 model"),
        (lambda: make_tiny_model("mistral"), "mistral model"),
    ],
)
def test_not_a_pruned_version_is_rejected(other, message):
    with pytest.raises(BenchInputError, match=message) as info:
        check_pruned_version(tiny_llama(), other(), "other")
    assert "--compare" in str(info.value)  # the message names the fix too


def test_pruned_version_is_accepted():
    check_pruned_version(tiny_llama(), tiny_pruned())
    check_pruned_version(tiny_llama(), tiny_llama(seed=1))  # same widths: a 0 % pruned model is fine
    check_pruned_version(tiny_llama(), tiny_llama(hidden_size=48, head_dim=16))  # stem-pruned: narrower hidden size


def test_different_tokenizer_is_rejected():
    check_same_tokenizer(byte_tokenizer(), byte_tokenizer())
    with pytest.raises(BenchInputError, match="encodes"):
        check_same_tokenizer(byte_tokenizer(), byte_tokenizer(reverse=True))
    with pytest.raises(BenchInputError, match="tokens but"):
        check_same_tokenizer(byte_tokenizer(), byte_tokenizer(size=200))


def test_sizes_that_do_not_fit_memory_are_rejected_before_running(monkeypatch):
    monkeypatch.setattr(bench, "_timed_generate", lambda *a: pytest.fail("must not run"))
    with pytest.raises(BenchInputError, match="lower --batch-sizes"):
        _small_bench(batch_sizes=(10 ** 7,), prompt_lens=(1024,))
    monkeypatch.setattr(bench, "available_memory", lambda device: 1000)
    with pytest.raises(BenchInputError, match="GiB is free"):
        _small_bench()


def test_other_bad_sizes_are_rejected():
    with pytest.raises(BenchInputError, match="positions"):
        _small_bench(prompt_lens=(2048,))
    with pytest.raises(BenchInputError, match="--new-tokens"):
        _small_bench(new_tokens=1)
    with pytest.raises(BenchInputError, match="batch sizes"):
        _small_bench(batch_sizes=(0,))
    with pytest.raises(BenchInputError, match="same --device"):
        benchmark_models({"dense": tiny_llama(), "half": tiny_pruned().to(torch.bfloat16)})


# -- command line ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser


def test_arguments_parse_and_reject_bad_lists():
    args = _parser().parse_args(["--compare", "a", "b", "--batch-sizes", "1,8", "--prompt-lens", "16"])
    assert args.model is None and args.compare == ["a", "b"]
    assert args.batch_sizes == [1, 8] and args.prompt_lens == [16] and args.new_tokens == 64
    for bad in (["--batch-sizes", "0,1"], ["--prompt-lens", "x"], ["--new-tokens", "-3"], []):
        with pytest.raises(SystemExit):
            _parser().parse_args(["--compare", "a", *bad] if bad else bad)


def test_run_bench_end_to_end(tmp_path, monkeypatch, capsys):
    zoo = {"dense": tiny_llama(), "out/pruned": tiny_pruned(), "wide": tiny_llama(intermediate_size=256)}
    monkeypatch.setattr(bench, "_load", lambda spec, device, dtype: (zoo[spec], byte_tokenizer()))
    argv = ["--model", "dense", "--compare", "out/pruned", "--batch-sizes", "1", "--prompt-lens", "8",
            "--new-tokens", "3", "--repeats", "1", "--device", "cpu", "--output", str(tmp_path)]
    assert run_bench(_parser().parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert "prefill speedup" in out and "pruned" in out
    data = json.loads((tmp_path / bench.JSON_NAME).read_text())
    assert data["config"]["models"] == {"dense": "dense", "pruned": "out/pruned"}
    assert data["environment"]["attention"] == "sdpa"
    assert (tmp_path / bench.CHART_NAME).stat().st_size > 0

    argv[argv.index("out/pruned")] = "wide"
    assert run_bench(_parser().parse_args(argv)) == 2
    assert "not a pruned version" in capsys.readouterr().err
