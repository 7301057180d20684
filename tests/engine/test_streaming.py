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
                "--calib-samples", "8", "--calib-seq-len", "16", "--eval-tokens", "256", "--offload", mode,
                "--compensate-carry", "0"]  # by default only an in-memory prune carries the refit's statistics
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
        monkeypatch.setattr(pruner_module, "available_memory_bytes", lambda *_, free=free: free)
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
    store = ShardStore(tmp_path)  # our plain-read loader reads them too, whole or by rows, in the file's dtype
    loaded = store.load(list(tensors))
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype and loaded[k].is_contiguous()
    assert torch.equal(store.load_rows("d", 2, 4), tensors["d"][2:4]) and store.load_rows("a", 1, 9).shape == (2, 5)
    assert torch.equal(store.gather_rows("b", torch.tensor([6, 0])), tensors["b"][[6, 0]])
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(StreamingError, match="corrupt or truncated"):
        ShardStore(tmp_path).read(list(tensors), torch.float32)
    with pytest.raises(StreamingError, match="corrupt or truncated.*'e' ends after"):
        store.load(list(tensors))  # a store opened before the file was cut short


def test_offload_auto_streams_only_folders_that_would_crowd_memory(tmp_path, monkeypatch):
    import adapt_engine.streaming as streaming

    _, folder = _saved(tmp_path)
    assert streaming.resolve_offload("layer", None, "float32") == "layer"
    assert streaming.resolve_offload("none", str(folder), "float32") == "none"
    assert streaming.resolve_offload("auto", None, "float32") == "none"  # the built-in GGUF loads whole
    assert streaming.resolve_offload("auto", str(tmp_path / "missing"), "float32") == "none"
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda *_: 1 << 40)
    assert streaming.resolve_offload("auto", str(folder), "float32") == "none"
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda *_: 1024)
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


# -- prefetch: the same results, the sweep's order, at most two layers resident, reader errors (issue 14 item 3) ----
def _prune_streamed(tmp_path, folder, settings, ids, target, name, **kw):
    streamed = open_streamed(folder, torch.float32, **kw)
    scratch = tmp_path / f"scratch-{name}"
    scratch.mkdir()
    spruner = AdaptPruner(streamed.model, settings, ids, streamed=streamed, scratch=scratch)
    spruner.prune_to(target)
    out = save_pruned(streamed.model, None, tmp_path / name, write_weights=streamed.write_weights)
    return spruner, load_pruned(out)


def test_prefetch_on_and_off_give_identical_saliency_widths_and_weights(tmp_path):
    model, folder = _saved(tmp_path)
    ids = _calib()
    opts = CalibPass(4, "cosine", "taylor", micro_batch_size=3)
    on = streamed_calibration_pass(open_streamed(folder, torch.float32, prefetch=True), ids, opts)
    off = streamed_calibration_pass(open_streamed(folder, torch.float32, prefetch=False), ids, opts)
    assert on[2] == off[2] and torch.equal(on[0], off[0])
    for a, b in zip(on[1].all_tensors(), off[1].all_tensors(), strict=True):
        assert torch.equal(a, b)
    settings = PruneSettings(steps=2, calib_batch_size=4, calib_micro_batch=3)
    target = AdaptPruner(model, settings, ids).target_from_sparsity(0.4)
    p_on, m_on = _prune_streamed(tmp_path, folder, settings, ids, target, "on", prefetch=True)
    p_off, m_off = _prune_streamed(tmp_path, folder, settings, ids, target, "off", prefetch=False)
    assert [r["widths"] for r in p_on.history] == [r["widths"] for r in p_off.history]
    for (name, p), (_, q) in zip(m_on.named_parameters(), m_off.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_layers_are_read_in_the_order_each_sweep_uses(tmp_path):
    model, folder = _saved(tmp_path)
    ids = _calib()
    streamed = open_streamed(folder, torch.float32)
    reads: list[int] = []
    read_layer = streamed._read_layer
    streamed._read_layer = lambda j, pin: reads.append(j) or read_layer(j, pin)
    streamed_calibration_pass(streamed, ids, CalibPass(4, "cosine", "taylor", micro_batch_size=3))
    assert reads == [0, 1, 2, 2, 1, 0]  # forward sweep, then backward sweep
    reads.clear()
    settings = PruneSettings(steps=1, calib_batch_size=4, compensate="none")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spruner = AdaptPruner(streamed.model, settings, ids, streamed=streamed, scratch=scratch)
    spruner.prune_to(spruner.target_from_sparsity(0.3))
    before, after = spruner.original_shapes, streamed.adapter.shapes()
    cut = [j for j in range(3) if before[j] != after[j]]
    assert cut and reads == [0, 1, 2, 2, 1, 0, *cut]  # then the cut sweep over the layers that lose something
    with streamed.prefetching([0, 1]), pytest.raises(RuntimeError, match="out of the prefetch order"):
        with streamed.resident(1):
            pass


@pytest.mark.parametrize("prefetch", [True, False])
def test_at_most_two_layers_are_resident(tmp_path, monkeypatch, prefetch):
    import itertools
    import threading
    import weakref

    from adapt_engine import prefetch as prefetch_module

    model, folder = _saved(tmp_path)
    lock, counter = threading.Lock(), itertools.count()
    live: dict[int, int] = {}  # fetched item -> how many of its tensors are still alive
    peak = [0]
    fetch = prefetch_module.LayerPrefetcher._fetch

    def died(item: int) -> None:
        with lock:
            live[item] -= 1
            if not live[item]:
                del live[item]

    def counting_fetch(self, index):
        tensors, event = fetch(self, index)
        with lock:
            item = next(counter)
            live[item] = len(tensors)
            peak[0] = max(peak[0], len(live))
        for t in tensors.values():
            weakref.finalize(t, died, item)
        return tensors, event

    monkeypatch.setattr(prefetch_module.LayerPrefetcher, "_fetch", counting_fetch)
    ids = _calib()
    settings = PruneSettings(steps=2, calib_batch_size=4, calib_micro_batch=3)
    target = AdaptPruner(model, settings, ids).target_from_sparsity(0.4)
    _prune_streamed(tmp_path, folder, settings, ids, target, "out", prefetch=prefetch)
    assert next(counter) > 12 and 1 <= peak[0] <= (2 if prefetch else 1)
    assert not live  # every layer released at the end


def test_an_error_reading_a_layer_surfaces(tmp_path):
    import threading

    _, folder = _saved(tmp_path)
    streamed = open_streamed(folder, torch.float32)
    read_layer = streamed._read_layer

    def broken(j: int, pin: bool):
        if j == 1:
            raise OSError("input/output error reading layer 1")
        return read_layer(j, pin)

    streamed._read_layer = broken
    with pytest.raises(OSError, match="reading layer 1"):
        streamed_calibration_pass(streamed, _calib(), CalibPass(4, "cosine", "taylor"))
    assert not [t for t in threading.enumerate() if t.name.startswith("adapt-prefetch")]
    assert all(is_placeholder(p.data) for layer in streamed.layer_params for p in layer.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_offload_layer_on_cuda_without_a_gpu_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    from adapt_engine.cli import main

    argv = ["prune", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), "--sparsity", "0.2",
            "--offload", "layer", "--device", "cuda"]
    assert main(argv) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_offload_auto_on_a_gpu_asks_the_gpu_for_free_memory(tmp_path, monkeypatch):
    import adapt_engine.streaming as streaming

    _, folder = _saved(tmp_path)
    asked = []
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda device="cpu": asked.append(str(device)) or 1 << 40)
    assert streaming.resolve_offload("auto", str(folder), "float32", torch.device("cuda", 1)) == "none"
    assert asked == ["cuda:1"]
    free = {"now": 1 << 40}
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["now"], 1 << 41))
    assert streaming.available_memory_bytes("cuda") == 1 << 40  # the GPU's free memory, not the host's
    assert streaming.resolve_offload("auto", str(folder), "float32", "cuda") == "none"
    free["now"] = 1024
    assert streaming.resolve_offload("auto", str(folder), "float32", "cuda") == "layer"


# -- the ends in pieces: embedding rows on demand, the head in vocabulary chunks (issue 14 item 2) ---------------
HEAD_CHUNK = 50 * 48 * 4  # 50 vocabulary rows of the tiny models' fp32 head: 7 chunks of a 320-token vocabulary


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])  # tied; untied; Gemma's embedding scale
def test_streamed_pass_with_the_head_in_chunks_matches_in_memory(tmp_path, family):
    model, folder = _saved(tmp_path, family)
    ids = _calib()
    raw, scores, loss = calibration_pass(DecoderAdapter(model), ids, 4, "cosine", "taylor", micro_batch_size=3)
    streamed = open_streamed(folder, torch.float32, head_chunk_bytes=HEAD_CHUNK)
    assert streamed.head_name is not None and streamed.embed_name is not None and streamed.head_rows == 50
    ends = [streamed.end_params[streamed.embed_name], streamed.end_params[streamed.head_name]]
    assert all(is_placeholder(p.data) for p in ends)  # neither end is ever whole in memory
    raw2, scores2, loss2 = streamed_calibration_pass(streamed, ids, CalibPass(4, "cosine", "taylor",
                                                                              micro_batch_size=3))
    assert torch.equal(raw2, raw)  # the forward sweep does not involve the head
    assert loss2 == pytest.approx(loss, rel=1e-6)
    for a, b in zip(scores.all_tensors(), scores2.all_tensors(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
    assert all(is_placeholder(p.data) for p in ends)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_prune_with_the_ends_in_pieces_equals_in_memory(tmp_path, family):
    model, folder = _saved(tmp_path, family)
    ids = _calib()
    settings = PruneSettings(steps=2, calib_batch_size=4, calib_micro_batch=3)
    pruner = AdaptPruner(model, settings, ids)
    target = pruner.target_from_sparsity(0.4)
    pruner.prune_to(target)
    spruner, reloaded = _prune_streamed(tmp_path, folder, settings, ids, target, "out", head_chunk_bytes=HEAD_CHUNK)
    assert [r["widths"] for r in spruner.history] == [r["widths"] for r in pruner.history]
    want = dict(model.named_parameters())
    for name, p in reloaded.named_parameters():  # the ends were copied to the output block by block
        assert torch.equal(p, want[name]), name
    streamed = open_streamed(tmp_path / "out", torch.float32, head_chunk_bytes=HEAD_CHUNK)
    batches = eval_batches(_calib(rows=3, seq=40, seed=5).flatten(), seq_len=16, batch_size=2)
    with torch.no_grad():
        nll = sum(float(causal_lm_loss(model, b, reduction="sum")) for b in batches)
    assert streamed_nll(streamed, batches) == pytest.approx(nll, rel=1e-6)


def test_a_soft_capped_head_stays_whole(tmp_path):
    model, folder = _saved(tmp_path, "gemma2")
    streamed = open_streamed(folder, torch.float32, head_chunk_bytes=HEAD_CHUNK)
    assert streamed.head_name is None  # its logits are not lm_head(hidden): the model's own loss needs it whole
    assert not is_placeholder(streamed.model.get_output_embeddings().weight.data)
    ids = _calib()
    _, scores, loss = calibration_pass(DecoderAdapter(model), ids, 5, None, "taylor")
    _, scores2, loss2 = streamed_calibration_pass(streamed, ids, CalibPass(5, None, "taylor"))
    assert loss2 == loss
    for a, b in zip(scores.all_tensors(), scores2.all_tensors(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("linkable", [True, False])
def test_cut_layers_are_linked_into_the_output_not_copied(tmp_path, monkeypatch, linkable):
    import errno
    import json
    import os

    import adapt_engine.streaming as streaming

    if not linkable:  # another file system: the layer is read and written like any other
        def refuse(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(streaming.os, "link", refuse)
    model, folder = _saved(tmp_path)
    ids = _calib()
    settings = PruneSettings(steps=1, calib_batch_size=5, compensate="none", layers="0,2")
    target = AdaptPruner(model, settings, ids).target_from_sparsity(0.2)
    streamed = open_streamed(folder, torch.float32)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    AdaptPruner(streamed.model, settings, ids, streamed=streamed, scratch=scratch).prune_to(target)
    assert sorted(streamed.rewritten) == [0, 2]  # layer 1 is frozen: never cut, read from the dense folder
    out = save_pruned(streamed.model, None, tmp_path / "out", write_weights=streamed.write_weights)
    shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for j in (0, 2):
        assert os.path.samefile(out / shards[f"model.layers.{j}.mlp.up_proj.weight"], streamed.rewritten[j]) == linkable
    pruner = AdaptPruner(model, settings, ids)
    pruner.prune_to(target)
    want = dict(model.named_parameters())
    for name, p in load_pruned(out).named_parameters():
        assert torch.equal(p, want[name]), name


def test_offload_layer_refuses_compensate_carry(tmp_path, tiny_model_dir, capsys):
    from adapt_engine.cli import main

    argv = ["prune", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), "--sparsity", "0.3",
            "--steps", "2", "--calib-samples", "8", "--calib-seq-len", "16", "--offload", "layer",
            "--compensate-carry", "1"]
    assert main(argv) == 2
    assert "--compensate-carry" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
