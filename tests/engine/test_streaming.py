"""Layer-streamed calibration and surgery equal the in-memory path (issue 14)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILY_CASES, make_tiny_model

from adapt_engine.adapters import DecoderAdapter
from adapt_engine.args import PruneSettings
from adapt_engine.evaluate import eval_batches
from adapt_engine.importance import CalibPass, calibration_pass
from adapt_engine.lm_loss import causal_lm_loss
from adapt_engine.pruner import AdaptPruner
from adapt_engine.saving import load_pruned, save_pruned
from adapt_engine.streaming import (
    StreamingError,
    is_placeholder,
    open_streamed,
    streamed_calibration_pass,
    streamed_nll,
)


def _calib(rows: int = 10, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _saved(tmp_path, family: str = "llama", gqa: bool = True):
    model = make_tiny_model(family, gqa=gqa, layers=3)
    folder = tmp_path / "dense"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize(("family", "gqa"), FAMILY_CASES)
def test_streamed_pass_equals_in_memory_bit_for_bit(tmp_path, family, gqa):
    model, folder = _saved(tmp_path, family, gqa)
    ids = _calib()
    raw, scores, loss = calibration_pass(DecoderAdapter(model), ids, 4, "cosine", "taylor", micro_batch_size=3)
    streamed = open_streamed(folder, torch.float32)
    opts = CalibPass(4, "cosine", "taylor", micro_batch_size=3)
    raw2, scores2, loss2 = streamed_calibration_pass(streamed, ids, opts)
    assert loss2 == loss
    assert torch.equal(raw2, raw)
    for a, b in zip(scores.all_tensors(), scores2.all_tensors(), strict=True):
        assert torch.equal(a, b)
    # Only the ends are resident after the pass.
    for layer in streamed.layer_params:
        assert all(is_placeholder(p.data) for p in layer.values())


@pytest.mark.parametrize("metric", ["vectorize", "param_mix"])
def test_streamed_pass_other_gradient_metrics(tmp_path, metric):
    model, folder = _saved(tmp_path)
    ids = _calib()
    _, scores, _ = calibration_pass(DecoderAdapter(model), ids, 5, None, metric, micro_batch_size=2)
    _, scores2, _ = streamed_calibration_pass(open_streamed(folder, torch.float32), ids,
                                              CalibPass(5, None, metric, micro_batch_size=2))
    for a, b in zip(scores.all_tensors(), scores2.all_tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("family", "compensate", "target"), [
    ("llama", "none", "hf"), ("llama", "lstsq", "hf"), ("qwen2", "lstsq", "hf"), ("gemma2", "lstsq", "hf"),
    ("llama", "lstsq", "vllm"), ("qwen2", "none", "vllm"),
])
def test_streamed_prune_equals_in_memory(tmp_path, family, compensate, target):
    model, folder = _saved(tmp_path, family)
    # vllm with the proportional split: layer 0 merges its KV heads, the others lose their attention entirely.
    settings = PruneSettings(steps=2, calib_batch_size=4, calib_micro_batch=3, compensate=compensate,
                             deploy_target=target, split="proportional" if target == "vllm" else "saliency")
    ids = _calib()
    pruner = AdaptPruner(model, settings, ids)
    target = pruner.target_from_sparsity(0.6 if target == "vllm" else 0.4)
    pruner.prune_to(target)
    streamed = open_streamed(folder, torch.float32)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spruner = AdaptPruner(streamed.model, settings, ids, streamed=streamed, scratch=scratch)
    spruner.prune_to(target)
    assert [r["widths"] for r in spruner.history] == [r["widths"] for r in pruner.history]
    if target == "vllm":
        widths = spruner.history[-1]["widths"]
        assert widths[0]["num_kv_heads"] == 1 and widths[1]["num_heads"] == 0
    assert [r["calib_loss"] for r in spruner.history] == [r["calib_loss"] for r in pruner.history]
    # The streamed output, saved shard by shard, reloads to the in-memory result.
    out = save_pruned(streamed.model, None, tmp_path / "streamed", write_weights=streamed.write_weights)
    reloaded = load_pruned(out)
    want = dict(model.named_parameters())
    for name, p in reloaded.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=0, atol=0)
    # Streamed perplexity equals the in-memory one on the pruned model.
    batches = eval_batches(_calib(rows=3, seq=40, seed=5).flatten(), seq_len=16, batch_size=2)
    with torch.no_grad():
        nll = sum(float(causal_lm_loss(model, b, reduction="sum")) for b in batches)
    assert streamed_nll(streamed, batches) == pytest.approx(nll, rel=1e-6)


def test_streamed_prune_of_a_pruned_folder_continues(tmp_path):
    model, folder = _saved(tmp_path)
    settings = PruneSettings(steps=1, calib_batch_size=5, compensate="none")
    ids = _calib()
    pruner = AdaptPruner(model, settings, ids)
    pruner.prune_to(pruner.target_from_sparsity(0.2))
    first = save_pruned(model, None, tmp_path / "first")
    streamed = open_streamed(first, torch.float32)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spruner = AdaptPruner(streamed.model, settings, ids, streamed=streamed, scratch=scratch)
    target = spruner.target_from_sparsity(0.3)
    spruner.prune_to(target)
    again = AdaptPruner(model, settings, ids)
    again.prune_to(again.target_from_sparsity(0.3))
    assert spruner.history[-1]["widths"] == again.history[-1]["widths"]


def test_streaming_refuses_what_it_cannot_do(tmp_path):
    model, folder = _saved(tmp_path)
    streamed = open_streamed(folder, torch.float32)
    scratch = tmp_path / "s"
    with pytest.raises(StreamingError, match="magnitude"):
        AdaptPruner(streamed.model, PruneSettings(importance="magnitude", compensate="none"), _calib(),
                    streamed=streamed, scratch=scratch)
    with pytest.raises(StreamingError, match="not a folder"):
        open_streamed(tmp_path / "model.gguf", torch.float32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(StreamingError, match="no safetensors"):
        open_streamed(tmp_path / "empty", torch.float32)


def test_prune_offload_layer_equals_offload_none(tmp_path, tiny_model_dir, capsys):
    import json

    from adapt_engine.cli import main

    reports = {}
    for mode in ("none", "layer"):
        out = tmp_path / mode
        argv = ["prune", "--model", str(tiny_model_dir), "--output", str(out), "--sparsity", "0.3", "--steps", "2",
                "--calib-samples", "8", "--calib-seq-len", "16", "--eval-tokens", "256", "--offload", mode]
        assert main(argv) == 0
        reports[mode] = json.loads((out / "pruning_report.json").read_text())
        assert not list(tmp_path.glob(".adapt-offload-*")), "the scratch folder must be removed"
    none, layer = reports["none"], reports["layer"]
    assert layer["offload"] == "layer" and none["offload"] == "none"
    assert layer["widths_after"] == none["widths_after"]
    assert layer["params_after"] == none["params_after"]
    assert layer["ppl_before"] == pytest.approx(none["ppl_before"], rel=1e-6)
    assert layer["ppl_after"] == pytest.approx(none["ppl_after"], rel=1e-6)
    assert "bench skipped" in capsys.readouterr().out
    a, b = load_pruned(tmp_path / "none"), load_pruned(tmp_path / "layer")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_offload_layer_needs_a_model_folder(tmp_path):
    from adapt_engine.cli import main

    assert main(["prune", "--output", str(tmp_path / "o"), "--sparsity", "0.2", "--offload", "layer"]) == 2


def test_streamed_compensation_replays_layers_when_statistics_do_not_fit(tmp_path, monkeypatch):
    import adapt_engine.pruner as pruner_module

    model, folder = _saved(tmp_path)
    settings = PruneSettings(steps=2, calib_batch_size=4, calib_micro_batch=3)
    ids = _calib()
    pruner = AdaptPruner(model, settings, ids)
    target = pruner.target_from_sparsity(0.4)
    pruner.prune_to(target)
    for free in (1 << 40, 1 << 10):  # all statistics fit (gathered in the sweep) / none fit (replayed per layer)
        monkeypatch.setattr(pruner_module, "available_memory_bytes", lambda free=free: free)
        streamed = open_streamed(folder, torch.float32)
        scratch = tmp_path / f"scratch{free}"
        scratch.mkdir()
        spruner = AdaptPruner(streamed.model, settings, ids, streamed=streamed, scratch=scratch)
        spruner.prune_to(target)
        assert [r["widths"] for r in spruner.history] == [r["widths"] for r in pruner.history]
        out = save_pruned(streamed.model, None, tmp_path / f"out{free}", write_weights=streamed.write_weights)
        for name, p in load_pruned(out).named_parameters():
            assert torch.equal(p, dict(model.named_parameters())[name]), (free, name)


def test_safetensors_written_from_memory_round_trip(tmp_path):
    from safetensors.torch import load_file

    from adapt_engine.streaming import ShardStore, write_safetensors

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7), "c": torch.zeros(0, 4),
               "d": torch.randn(4, 6).t(), "e": torch.randn(2, 2).half()}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    theirs = load_file(str(tmp_path / "model.safetensors"))  # the reference reader accepts our files
    for k, v in tensors.items():
        assert torch.equal(theirs[k], v) and theirs[k].dtype == v.dtype
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(StreamingError, match="corrupt or truncated"):
        ShardStore(tmp_path).read(list(tensors), torch.float32)


def test_offload_auto_streams_only_folders_that_would_crowd_memory(tmp_path, monkeypatch):
    import adapt_engine.streaming as streaming

    _, folder = _saved(tmp_path)
    assert streaming.resolve_offload("layer", None, "float32") == "layer"
    assert streaming.resolve_offload("none", str(folder), "float32") == "none"
    assert streaming.resolve_offload("auto", None, "float32") == "none"  # the built-in GGUF loads whole
    assert streaming.resolve_offload("auto", str(tmp_path / "missing"), "float32") == "none"
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 1 << 40)
    assert streaming.resolve_offload("auto", str(folder), "float32") == "none"
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 1024)
    assert streaming.resolve_offload("auto", str(folder), "float32") == "layer"


def test_streamed_pass_under_bf16_autocast_equals_in_memory(tmp_path):
    model, folder = _saved(tmp_path)
    ids = _calib()
    opts = CalibPass(4, "cosine", "taylor", calib_dtype="bfloat16", micro_batch_size=2)
    raw, scores, loss = calibration_pass(DecoderAdapter(model), ids, **vars(opts))
    raw2, scores2, loss2 = streamed_calibration_pass(open_streamed(folder, torch.float32), ids, opts)
    assert loss2 == loss and torch.equal(raw2, raw)
    for a, b in zip(scores.all_tensors(), scores2.all_tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("metric", "aggregate"), [("mix", "sum"), ("taylor", "max"), ("mix", "last")])
def test_streamed_pass_mix_and_aggregate(tmp_path, metric, aggregate):
    model, folder = _saved(tmp_path)
    ids = _calib()
    mix = (0.3, 0.7, 0.01)
    _, scores, _ = calibration_pass(DecoderAdapter(model), ids, 5, None, metric, micro_batch_size=2,
                                    aggregate=aggregate, mix=mix)
    _, scores2, _ = streamed_calibration_pass(open_streamed(folder, torch.float32), ids,
                                              CalibPass(5, None, metric, micro_batch_size=2, aggregate=aggregate,
                                                        mix=mix))
    for a, b in zip(scores.all_tensors(), scores2.all_tensors(), strict=True):
        assert torch.equal(a, b)
