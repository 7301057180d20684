"""Stem saliency: the calibration pass scores hidden channel c by Σ|g ⊙ w| over every tensor the channel spans."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine.adapters import DecoderAdapter
from adapt_engine.importance import calibration_pass, magnitude_scores
from adapt_engine.lm_loss import causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=6, length=10):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama-bias", "gemma2"])  # tied, untied, biases, 4 norms
def test_stem_taylor_equals_autograd_reference(family):
    model = make_tiny_model(family, True)
    adapter = DecoderAdapter(model)
    ids = _calib()
    _, scores, _ = calibration_pass(adapter, ids, batch_size=6, similarity=None, saliency_metric="taylor", stem=True)
    model.zero_grad()
    causal_lm_loss(model, ids).backward()
    want = torch.zeros(adapter.hidden_size, dtype=torch.float64)
    for p, dim in adapter.stem_members():
        other = [d for d in range(p.dim()) if d != dim]
        contrib = (p.grad * p.detach()).abs().double()
        want += contrib.sum(other) if other else contrib
    torch.testing.assert_close(scores.stem.double(), want, rtol=1e-4, atol=1e-7 * float(want.max()))
    model.zero_grad(set_to_none=True)
    # heads and MLP scores are those of a pass without stem
    _, plain, _ = calibration_pass(adapter, ids, batch_size=6, similarity=None, saliency_metric="taylor")
    assert plain.stem is None
    for a, b in zip(plain.all_tensors(), scores.all_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None or not p.requires_grad for p in model.parameters())


def test_stem_magnitude_sums_every_member():
    model = make_tiny_model("mistral")
    adapter = DecoderAdapter(model)
    got = magnitude_scores(adapter, stem=True).stem
    want = sum(p.detach().abs().sum([d for d in range(p.dim()) if d != dim]) if p.dim() > 1 else p.detach().abs()
               for p, dim in adapter.stem_members())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["vectorize", "param_mix"])
def test_other_gradient_metrics_score_stem_channels(metric):
    adapter = DecoderAdapter(make_tiny_model("llama"))
    _, scores, _ = calibration_pass(adapter, _calib(), 3, None, metric, stem=True)
    assert scores.stem.shape == (48,) and torch.isfinite(scores.stem).all() and scores.stem.abs().sum() > 0
