"""One Adapt-Accel optimizer step: the fused LM loss gives the same step as the model's own loss."""

import copy

import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine.optim import build_optimizer
from adapt_engine.training import train_step


@pytest.mark.parametrize("family,gqa", [("llama", True), ("qwen2", False)])  # tied and untied LM heads
def test_fused_loss_step_equals_plain_step(family, gqa):
    plain = make_tiny_model(family, gqa=gqa).train()
    fused = copy.deepcopy(plain)
    batch = torch.randint(0, 320, (6, 12), generator=torch.Generator().manual_seed(1))
    outs = []
    for model, fused_of in ((plain, None), (fused, fused)):
        opt = build_optimizer(model, lr=1e-3)
        outs.append(train_step(model, opt, batch, lr=1e-3, micro_batch=4, max_grad_norm=1.0, fused_loss_of=fused_of))
    assert outs[0]["loss"] == pytest.approx(outs[1]["loss"], rel=1e-5)
    assert outs[0]["grad_norm"] == pytest.approx(outs[1]["grad_norm"], rel=1e-4)
    # AdamW's first step is about lr * sign(g): where g is ~0, rounding-level gradient differences move a weight
    # by up to a few percent of one step, so weights are compared to a tenth of lr (gradients: test_lm_loss).
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)
