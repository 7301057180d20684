"""The causal-LM loss fused with the LM head: equal to the model's own loss and gradients."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine.adapters import fused_lm_head
from adapt_engine.lm_loss import causal_lm_loss, causal_lm_loss_through, frozen_head_weight, shifted_targets


def _ids(n=3, length=10, seed=0):
    return torch.randint(3, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def test_shifted_targets():
    ids = torch.tensor([[5, 6, 7]])
    assert shifted_targets(ids).tolist() == [[6, 7, -100]]


@pytest.mark.parametrize("family, gqa", [("llama", True), ("qwen2", False)])  # tied and untied LM head
@pytest.mark.parametrize("through", [False, True])
def test_training_loss_and_every_gradient_match_the_model_loss(family, gqa, through):
    """Accel's step: the LM head (and a tied embedding) get the same gradient as with full logits."""
    grads = []
    for fused in (True, False):
        model = make_tiny_model(family, gqa)
        model.train()
        if fused:
            loss = causal_lm_loss_through(model, model, _ids()) if through else causal_lm_loss(model, _ids())
        else:
            loss = model(input_ids=_ids(), labels=_ids(), use_cache=False).loss
        loss.backward()
        grads.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_f, g_f), (loss_p, g_p) = grads
    assert abs(loss_f - loss_p) <= 1e-5 * loss_p
    assert fused_lm_head(make_tiny_model(family, gqa)).weight.requires_grad
    for name in g_p:
        torch.testing.assert_close(g_f[name], g_p[name], rtol=1e-4, atol=1e-6 * float(g_p[name].abs().max()),
                                   msg=name)


def test_soft_capped_family_keeps_its_own_loss():
    model = make_tiny_model("gemma2", True)
    assert fused_lm_head(model) is None
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, ids), model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("family, gqa", [("llama", True), ("qwen2", False)])  # tied and untied LM head
def test_head_cast_once_gives_the_same_loss_and_gradients(family, gqa):
    """Calibration's micro-batches share one bf16 copy of the frozen LM head; loss and every gradient are those
    of the loss that casts the head itself."""
    model = make_tiny_model(family, gqa)
    head = fused_lm_head(model)
    head.weight.requires_grad_(False)
    assert frozen_head_weight(model) is None  # autocast off: nothing to cast
    runs = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            weight = frozen_head_weight(model) if shared else None
            assert (weight is not None and weight.dtype == torch.bfloat16) == shared
            loss = causal_lm_loss(model, _ids(), head_weight=weight)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((float(loss.detach()), grads))
    (plain_loss, plain), (shared_loss, got) = runs
    assert shared_loss == plain_loss
    assert plain.keys() == got.keys()
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=0, atol=0)
    head.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen_head_weight(model) is None  # a head that learns takes its gradient through its own cast
