"""Calibration pass: the fused LM loss changes neither the saliency nor the plan; bf16 autocast; dtypes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine import lm_loss
from adapt_engine.adapters import DecoderAdapter
from adapt_engine.importance import calibration_pass, resolve_calib_dtype
from adapt_engine.pruner import AdaptPruner, PruneSettings


def _calib(n=8, length=12, seed=0):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def _unfused(monkeypatch):
    """Force the model's own loss (full logits), as calibration computed it before the fused kernel."""
    monkeypatch.setattr(lm_loss, "fused_lm_head", lambda model: None)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied LM head
def test_fused_loss_keeps_saliency_and_similarity(monkeypatch, family):
    model = make_tiny_model(family, True)
    adapter = DecoderAdapter(model)
    raw_f, scores_f, loss_f = calibration_pass(adapter, _calib(), 4, "cosine", "taylor")
    with monkeypatch.context() as mp:
        _unfused(mp)
        raw_p, scores_p, loss_p = calibration_pass(adapter, _calib(), 4, "cosine", "taylor")
    assert abs(loss_f - loss_p) <= 1e-5 * abs(loss_p)
    torch.testing.assert_close(raw_f, raw_p, rtol=1e-6, atol=1e-9)
    for a, b in zip(scores_f.all_tensors(), scores_p.all_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_fused_loss_keeps_the_plan(monkeypatch):
    widths = []
    for fused in (True, False):
        model = make_tiny_model("llama", True, seed=3)
        with monkeypatch.context() as mp:
            if not fused:
                _unfused(mp)
            pruner = AdaptPruner(model, PruneSettings(steps=3, calib_batch_size=4), _calib(seed=1))
            records = pruner.prune_to(pruner.target_from_sparsity(0.5))
        widths.append([r["widths"] for r in records])
    assert widths[0] == widths[1]


def test_lm_head_stays_frozen_and_gradient_free():
    model = make_tiny_model("qwen2", True)
    head = model.get_output_embeddings()
    calibration_pass(DecoderAdapter(model), _calib(), 4, None, "taylor")
    assert head.weight.grad is None and all(p.grad is None for p in model.parameters())


def test_causal_lm_loss_matches_the_model_loss_sum_and_mean():
    model = make_tiny_model("llama", False)
    ids = _calib(3, 9)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        want_sum = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
        torch.testing.assert_close(lm_loss.causal_lm_loss(model, ids, "sum"), want_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm_loss.causal_lm_loss(model, ids), model(input_ids=ids, labels=ids).loss,
                                   rtol=1e-5, atol=1e-6)


def test_bf16_calibration_keeps_fp32_weights_and_scores():
    model = make_tiny_model("llama", True)
    adapter = DecoderAdapter(model)
    raw32, s32, loss32 = calibration_pass(adapter, _calib(), 4, "cosine", "taylor")
    raw16, s16, loss16 = calibration_pass(adapter, _calib(), 4, "cosine", "taylor", calib_dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(t.dtype == torch.float32 for t in s16.all_tensors())
    assert abs(loss16 - loss32) < 0.05 * loss32
    flat32 = torch.cat([t.flatten() for t in s32.all_tensors()])
    flat16 = torch.cat([t.flatten() for t in s16.all_tensors()])
    assert torch.corrcoef(torch.stack([flat32, flat16]))[0, 1] > 0.95  # the same ordering, roughly
    assert (raw16 - raw32).abs().max() < 0.05 * raw32.abs().max()


def test_calib_dtype_choices():
    assert resolve_calib_dtype("float32", "cpu") == torch.float32
    assert resolve_calib_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_calib_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="--calib-dtype"):
        resolve_calib_dtype("fp8", "cpu")
    with pytest.raises(ValueError, match="--calib-dtype"):
        PruneSettings(calib_dtype="half").validate()


@pytest.mark.parametrize("metric", ["taylor", "vectorize", "param_mix"])
def test_micro_batches_give_the_scores_of_the_whole_batch(metric):
    model = make_tiny_model("llama", True)
    adapter = DecoderAdapter(model)
    raw_a, a, loss_a = calibration_pass(adapter, _calib(), 4, "cosine", metric)
    raw_b, b, loss_b = calibration_pass(adapter, _calib(), 4, "cosine", metric, micro_batch_size=3)  # 3 + 1
    assert abs(loss_a - loss_b) <= 1e-5 * loss_a
    torch.testing.assert_close(raw_a, raw_b, rtol=1e-6, atol=1e-9)
    for x, y in zip(a.all_tensors(), b.all_tensors()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6 * float(x.abs().max()))
    assert all(p.grad is None for p in model.parameters())


def test_micro_batches_keep_the_plan():
    widths = []
    for micro in (None, 2):
        model = make_tiny_model("qwen2", True, seed=2)
        pruner = AdaptPruner(model, PruneSettings(steps=2, calib_batch_size=4, calib_micro_batch=micro), _calib())
        widths.append([r["widths"] for r in pruner.prune_to(pruner.target_from_sparsity(0.4))])
    assert widths[0] == widths[1]
