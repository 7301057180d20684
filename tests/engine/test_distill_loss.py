"""The distillation loss: the chunked KL equals the plain float64 one (value and gradients), is exactly 0 with
teacher == student, gradients reach only the student, and the layer term refuses different hidden sizes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from adapt_engine.distill_loss import DistillLoss, layer_mse, linear_kl
from adapt_engine.errors import UsageError
from adapt_engine.lm_loss import causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_kl(hs, ws, ht, wt, temperature):
    zs = (hs.double() @ ws.double().t()) / temperature
    zt = (ht.double() @ wt.double().t()) / temperature
    log_p, log_q = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@pytest.mark.parametrize("temperature,chunk", [(1.0, None), (2.0, 3), (0.5, 7)])
def test_linear_kl_matches_float64_reference_and_its_gradients(temperature, chunk):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    ws = torch.randn(50, 16, generator=g, requires_grad=True)
    ht, wt = torch.randn(2, 9, 16, generator=g), torch.randn(50, 16, generator=g)
    got = linear_kl(hs, ws, ht, wt, temperature, chunk=chunk)
    got.backward()
    hs2, ws2 = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    want = _reference_kl(hs2.reshape(-1, 16), ws2, ht.reshape(-1, 16), wt, temperature)
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.grad, hs2.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws.grad, ws2.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.fixture
def tiny():
    from tiny_models import make_tiny_model

    torch.manual_seed(0)
    return make_tiny_model("llama", gqa=True, vocab=64)


def _ids(vocab=64):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def test_kl_and_layer_terms_are_exactly_zero_when_teacher_is_student(tiny):
    teacher = copy.deepcopy(tiny).requires_grad_(False)
    loss_fn = DistillLoss(teacher, temperature=2.0, layer_weight=1.0)
    loss, terms = loss_fn(tiny, tiny, _ids())
    assert float(terms["kl"]) == 0.0 and float(terms["layer"]) == 0.0 and float(loss.detach()) == 0.0
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in tiny.parameters())


def test_gradients_reach_only_the_student(tiny):
    teacher = copy.deepcopy(tiny)  # deliberately left trainable: the loss alone must keep it out of the graph
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, terms = DistillLoss(teacher, layer_weight=0.5, ce_weight=0.3)(tiny, tiny, _ids())
    assert set(terms) == {"kl", "layer", "ce"} and float(terms["kl"]) > 0 and float(terms["layer"]) > 0
    torch.testing.assert_close(loss, terms["kl"] + 0.5 * terms["layer"] + 0.3 * terms["ce"])
    torch.testing.assert_close(terms["ce"], causal_lm_loss(tiny, _ids()).detach())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in tiny.parameters())


def test_layer_weight_zero_skips_the_layer_term(tiny):
    teacher = copy.deepcopy(tiny).requires_grad_(False)
    _, terms = DistillLoss(teacher, layer_weight=0.0)(tiny, tiny, _ids())
    assert set(terms) == {"kl"}


def test_layer_term_refuses_different_hidden_sizes():
    with pytest.raises(UsageError, match="differ in size.*--kd-layer-weight 0"):
        layer_mse([torch.zeros(1, 2, 8)] * 3, [torch.zeros(1, 2, 6)] * 3)
    with pytest.raises(UsageError, match="decoder layers"):
        layer_mse([torch.zeros(1, 2, 8)] * 3, [torch.zeros(1, 2, 8)] * 4)


def test_hidden_size_mismatch_between_models_is_a_clear_error(tiny):
    cfg = copy.deepcopy(tiny.config)
    cfg.hidden_size = tiny.config.hidden_size * 2
    other = type(tiny)(cfg).requires_grad_(False)
    with pytest.raises(UsageError, match="hidden size"):
        DistillLoss(other, layer_weight=0.0)(tiny, tiny, _ids())
