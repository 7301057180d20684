"""Calibration pass: the fused LM loss changes neither the saliency nor the plan; bf16 autocast; dtypes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine import importance, lm_loss
from adapt_engine.adapters import DecoderAdapter
from adapt_engine.args import AccelConfig
from adapt_engine.errors import UsageError
from adapt_engine.importance import (
    MATH_ATTENTION_MAX_SEQ,
    _cpu_has_fast_bf16,
    calib_autocast,
    calib_compute_dtype,
    calibration_pass,
    resolve_calib_dtype,
)
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


def test_short_bf16_windows_use_the_math_attention_kernel(monkeypatch):
    """Windows of at most MATH_ATTENTION_MAX_SEQ tokens under bf16 on CPU run SDPA's math kernel (faster there, and
    computed in float32); longer windows and float32 passes keep the flash kernel, and both kernels score alike."""
    for dtype, seq, flash in (("bfloat16", 64, False), ("bfloat16", MATH_ATTENTION_MAX_SEQ + 1, True),
                              ("float32", 64, True), ("bfloat16", None, True)):
        with calib_autocast(dtype, "cpu", torch.float32, seq_len=seq)():
            assert torch.backends.cuda.flash_sdp_enabled() is flash, (dtype, seq)
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    adapter = DecoderAdapter(make_tiny_model("llama", True))
    raw_m, s_m, loss_m = calibration_pass(adapter, _calib(), 4, "cosine", "taylor", calib_dtype="bfloat16",
                                          micro_batch_size=2)
    monkeypatch.setattr(importance, "MATH_ATTENTION_MAX_SEQ", 0)
    raw_f, s_f, loss_f = calibration_pass(adapter, _calib(), 4, "cosine", "taylor", calib_dtype="bfloat16",
                                          micro_batch_size=2)
    assert abs(loss_m - loss_f) < 1e-2 * loss_f
    flat_m = torch.cat([t.flatten() for t in s_m.all_tensors()])
    flat_f = torch.cat([t.flatten() for t in s_f.all_tensors()])
    assert torch.corrcoef(torch.stack([flat_m, flat_f]))[0, 1] > 0.99
    assert (raw_m - raw_f).abs().max() < 1e-2 * raw_f.abs().max()


def test_bf16_micro_batches_score_like_one_batch():
    """Under bf16 the weights' casts are kept across a batch's micro-batches (one autocast region per batch) and
    the backward runs with autocast off: the scores equal one unsplit batch's, up to bf16 rounding."""
    adapter = DecoderAdapter(make_tiny_model("llama", True))
    _, whole, loss_whole = calibration_pass(adapter, _calib(), 4, None, "taylor", calib_dtype="bfloat16")
    _, split, loss_split = calibration_pass(adapter, _calib(), 4, None, "taylor", calib_dtype="bfloat16",
                                            micro_batch_size=1)
    assert all(p.grad is None for p in adapter.model.parameters())
    assert abs(loss_whole - loss_split) < 1e-2 * loss_whole
    for a, b in zip(whole.all_tensors(), split.all_tensors()):
        torch.testing.assert_close(b, a, rtol=0.05, atol=1e-3 * float(a.abs().max()))


def test_calib_compute_dtype_and_defaults():
    """`prune` calibrates in bf16 where the device is fast at it (the default since issue 13); accel stays float32;
    bf16 weights compute in bf16 whatever the flag says."""
    fast = torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    assert PruneSettings().calib_dtype == "auto"
    assert AccelConfig(output="o").prune.calib_dtype == "float32"
    assert calib_compute_dtype("auto", "cpu", torch.float32) == fast
    assert calib_compute_dtype("float32", "cpu", torch.float32) == torch.float32
    assert calib_compute_dtype("bfloat16", "cpu", torch.float32) == torch.bfloat16
    assert calib_compute_dtype("float32", "cpu", torch.bfloat16) == torch.bfloat16


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


def _full_gradient_model(calib):
    import copy

    model = make_tiny_model("llama", True)
    ref = copy.deepcopy(model)
    ref(input_ids=calib, labels=calib).loss.backward()
    return model, ref


@pytest.mark.parametrize("how", ["sum", "prod", "max", "last"])
def test_aggregate_combines_each_member_tensors_taylor_scores(how):
    """--aggregate: a group's score is the sum / product / max / last of its member tensors' own Σ|w·g|."""
    calib = torch.randint(0, 320, (4, 12), generator=torch.Generator().manual_seed(0))
    model, ref = _full_gradient_model(calib)
    _, scores, _ = calibration_pass(DecoderAdapter(model), calib, batch_size=4, similarity=None,
                                    saliency_metric="taylor", aggregate=how)
    mlp, attn = ref.model.layers[1].mlp, ref.model.layers[1].self_attn
    per = [(lin.weight * lin.weight.grad).abs().sum(1 - dim).detach().double()
           for lin, dim in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1))]
    heads = [(lin.weight * lin.weight.grad).abs().sum(1 - dim).view(6, 8).sum(1).detach().double()
             for lin, dim in ((attn.q_proj, 0), (attn.o_proj, 1))]
    combine = {"sum": lambda xs: sum(xs), "prod": lambda xs: xs[0] * xs[1] * xs[2] if len(xs) == 3 else xs[0] * xs[1],
               "max": lambda xs: torch.stack(xs).max(0).values, "last": lambda xs: xs[-1]}[how]
    torch.testing.assert_close(scores.mlp[1], combine(per).float(), rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(scores.q_heads[1], combine(heads).float(), rtol=1e-4, atol=1e-12)


def test_aggregate_sum_default_is_the_original_path_bit_for_bit():
    calib = torch.randint(0, 320, (8, 12), generator=torch.Generator().manual_seed(1))
    a, b = make_tiny_model("llama", True), make_tiny_model("llama", True)
    _, default, _ = calibration_pass(DecoderAdapter(a), calib, 4, None, "taylor", micro_batch_size=2)
    _, summed, _ = calibration_pass(DecoderAdapter(b), calib, 4, None, "taylor", micro_batch_size=2, aggregate="sum")
    for x, y in zip(default.all_tensors(), summed.all_tensors()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("alpha,scale", [((1.0, 1.0), 1.0), ((0.3, 0.7), 1e-3), ((0.0, 1.0), 10.0)])
def test_mix_is_alpha1_vector_plus_alpha2_scale_element(alpha, scale):
    """--importance mix (AdaPruner Eq. 5): α1·I_vector + α2·s·I_element from one backward pass."""
    calib = torch.randint(0, 320, (8, 12), generator=torch.Generator().manual_seed(2))
    parts = {}
    for metric in ("vectorize", "param_mix", "mix"):
        model = make_tiny_model("llama", True)
        _, parts[metric], _ = calibration_pass(DecoderAdapter(model), calib, 4, None, metric,
                                               mix=(*alpha, scale))
    for v, e, m in zip(parts["vectorize"].all_tensors(), parts["param_mix"].all_tensors(), parts["mix"].all_tensors()):
        torch.testing.assert_close(m, alpha[0] * v + alpha[1] * scale * e, rtol=1e-6, atol=0)


def test_mix_and_aggregate_flags_reach_the_pruner():
    calib = torch.randint(0, 320, (8, 12), generator=torch.Generator().manual_seed(3))
    results = []
    for kw in (dict(), dict(importance="mix", mix_alpha=[0.2, 0.8], mix_scale=0.01), dict(aggregate="max")):
        model = make_tiny_model("llama", True)
        pruner = AdaptPruner(model, PruneSettings(steps=1, compensate="none", **kw), calib)
        pruner.prune_to(pruner.target_from_sparsity(0.4))
        results.append([tuple(w.values()) for w in pruner.history[-1]["widths"]] + [
            float(sum(p.detach().sum() for p in model.parameters()))])
    assert results[0] != results[1] and results[0] != results[2]
    for bad in ([0.0, 0.0], [-1.0, 1.0], [1.0]):
        with pytest.raises(UsageError, match="--mix-alpha"):
            PruneSettings(importance="mix", mix_alpha=bad).validate()
