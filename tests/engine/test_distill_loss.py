"""The distillation loss: the chunked KL equals the plain float64 one (value and gradients), is exactly 0 with
teacher == student, gradients reach only the student, and the layer term refuses different hidden sizes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adapt_engine.kernels.linear_ce import CHUNK_ELEMS

from adapt_engine.distill_loss import (
    DistillLoss,
    layer_mse,
    linear_kl,
    linear_kl_ce,
    linear_kl_reference,
)
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


# Worst error relative to the largest magnitude of the float64 truth. 16-bit: the logits themselves are rounded
# to 8 (bf16) or 11 (fp16) bits before the float32 softmaxes, as in the unfused loss in that dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().double()
    return float((got.detach().double() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def _kl_case(lead, vocab, hidden, s_dtype, t_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*lead, hidden, generator=g).to(s_dtype).requires_grad_()
    ws = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(s_dtype).requires_grad_()
    ht = torch.randn(*lead, hidden, generator=g).to(t_dtype)
    wt = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(t_dtype)
    return hs, ws, ht, wt


def _check_against_reference(hs, ws, ht, wt, temperature, chunk, tol):
    got = linear_kl(hs, ws, ht, wt, temperature, chunk=chunk)
    got.backward()
    hs2, ws2 = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    want = linear_kl_reference(hs2, ws2, ht, wt, temperature)
    want.backward()
    assert got.dtype == (torch.float64 if hs.dtype == torch.float64 else torch.float32)
    assert hs.grad.dtype == hs.dtype and ws.grad.dtype == ws.dtype
    for name, a, b in (("kl", got, want), ("grad hidden", hs.grad, hs2.grad), ("grad head", ws.grad, ws2.grad)):
        assert _rel_err(a, b.double()) <= tol, (name, _rel_err(a, b.double()), tol)


# (lead shape, vocab, hidden, chunk): one token; odd sizes everywhere; chunks of 1, of a non-divisor, and
# larger than the batch; the default chunk.
KL_CASES = [((1,), 7, 3, None), ((3, 5), 37, 13, 1), ((2, 9), 101, 16, 4), ((4, 7), 53, 11, 64),
            ((2, 33), 211, 24, None)]


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("case", KL_CASES, ids=str)
@pytest.mark.parametrize("temperature", (1.0, 2.5))
def test_linear_kl_matches_reference_across_shapes_and_dtypes(case, dtype, temperature):
    lead, vocab, hidden, chunk = case
    hs, ws, ht, wt = _kl_case(lead, vocab, hidden, dtype, dtype, seed=len(lead) + vocab)
    _check_against_reference(hs, ws, ht, wt, temperature, chunk, TOL[dtype])


@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=str)
def test_linear_kl_student_and_teacher_in_different_dtypes(s_dtype, t_dtype):
    """A float32 student beside a bfloat16 teacher (--autocast none, --teacher-dtype auto) and the reverse."""
    hs, ws, ht, wt = _kl_case((3, 7), 61, 12, s_dtype, t_dtype, seed=5)
    _check_against_reference(hs, ws, ht, wt, 1.0, 4, max(TOL[s_dtype], TOL[t_dtype]))


def test_linear_kl_under_autocast_gives_float32_gradients_to_float32_inputs():
    hs, ws, ht, wt = _kl_case((2, 9), 53, 16, torch.float32, torch.bfloat16, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_kl(hs, ws, ht, wt, chunk=5)
    got.backward()
    want_h, want_w = (x.detach().bfloat16().float().requires_grad_() for x in (hs, ws))  # what autocast sees
    want = linear_kl_reference(want_h, want_w, ht, wt)
    want.backward()
    assert hs.grad.dtype == ws.grad.dtype == torch.float32
    for a, b in ((got, want), (hs.grad, want_h.grad), (ws.grad, want_w.grad)):
        assert _rel_err(a, b.double()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_linear_kl_is_exactly_zero_for_equal_models_in_every_chunk_layout(dtype):
    hs, ws, _, _ = _kl_case((3, 11), 97, 10, dtype, dtype, seed=7)
    for chunk in (1, 4, 33, None):
        hs.grad = ws.grad = None
        kl = linear_kl(hs, ws, hs.detach(), ws.detach(), 1.7, chunk=chunk)
        kl.backward()
        assert float(kl.detach()) == 0.0 and torch.count_nonzero(hs.grad) == 0 and torch.count_nonzero(ws.grad) == 0


def test_linear_kl_without_gradients_gives_the_value_only():
    hs, ws, ht, wt = _kl_case((2, 5), 31, 8, torch.float32, torch.float32, seed=8)
    with torch.no_grad():
        got = linear_kl(hs, ws, ht, wt, chunk=3)
    assert not got.requires_grad
    assert _rel_err(got, linear_kl_reference(hs, ws, ht, wt).detach()) <= TOL[torch.float32]


def test_linear_kl_default_chunk_covers_a_large_vocabulary_in_several_chunks():
    vocab = 4099
    rows = CHUNK_ELEMS // vocab
    hs, ws, ht, wt = _kl_case((rows + 3,), vocab, 8, torch.float32, torch.float32, seed=9)
    _check_against_reference(hs, ws, ht, wt, 1.0, None, TOL[torch.float32])


def test_linear_kl_of_no_tokens_is_zero_with_zero_gradients():
    hs, ws, ht, wt = _kl_case((2, 0), 11, 4, torch.bfloat16, torch.bfloat16, seed=13)
    loss, kl, ce = linear_kl_ce(hs, ws, ht, wt, torch.zeros(2, 0, dtype=torch.long), 1.0, 1.0)
    loss.backward()
    assert all(float(x.detach()) == 0.0 for x in (loss, kl, ce)) and hs.grad.shape == hs.shape
    assert torch.count_nonzero(ws.grad) == 0


def test_linear_kl_refuses_mixed_dtypes_within_one_model():
    hs, ws, ht, wt = _kl_case((2, 3), 11, 4, torch.float32, torch.float32, seed=10)
    with pytest.raises(TypeError, match="one dtype"):
        linear_kl(hs, ws.detach().bfloat16(), ht, wt)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", KL_CASES[1:4], ids=str)
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 1.0), (1.0, 0.3), (2.5, 0.7)])
def test_linear_kl_ce_equals_kl_plus_weighted_cross_entropy(case, dtype, temperature, ce_weight):
    """The cross-entropy made from the KL's own logit chunks: values and the gradient of kl + w·ce against
    float64 references (the KL's and F.cross_entropy of the full logits)."""
    lead, vocab, hidden, chunk = case
    hs, ws, ht, wt = _kl_case(lead, vocab, hidden, dtype, dtype, seed=vocab)
    targets = torch.randint(0, vocab, lead, generator=torch.Generator().manual_seed(vocab))
    loss, kl, ce = linear_kl_ce(hs, ws, ht, wt, targets, temperature, ce_weight, chunk=chunk)
    assert loss.requires_grad and not kl.requires_grad and not ce.requires_grad
    loss.backward()
    hs2, ws2 = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    want_kl = linear_kl_reference(hs2, ws2, ht, wt, temperature)
    want_ce = F.cross_entropy(hs2.reshape(-1, hidden).double() @ ws2.double().t(), targets.reshape(-1))
    want = want_kl + ce_weight * want_ce
    want.backward()
    for name, a, b in (("loss", loss, want), ("kl", kl, want_kl), ("ce", ce, want_ce),
                       ("grad hidden", hs.grad, hs2.grad), ("grad head", ws.grad, ws2.grad)):
        assert _rel_err(a, b.detach().double()) <= TOL[dtype], (name, _rel_err(a, b.detach().double()))


def test_linear_kl_ce_without_targets_is_the_kl():
    hs, ws, ht, wt = _kl_case((2, 5), 31, 8, torch.float32, torch.float32, seed=11)
    loss, kl, ce = linear_kl_ce(hs, ws, ht, wt, None, 1.5, 0.0, chunk=3)
    assert float(ce) == 0.0 and torch.equal(loss.detach(), kl) and torch.equal(kl, linear_kl(hs, ws, ht, wt, 1.5, 3))


def test_linear_kl_ce_refuses_bad_targets():
    hs, ws, ht, wt = _kl_case((2, 3), 11, 4, torch.float32, torch.float32, seed=12)
    with pytest.raises(ValueError, match="shaped"):
        linear_kl_ce(hs, ws, ht, wt, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        linear_kl_ce(hs, ws, ht, wt, torch.full((2, 3), -100))


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


@pytest.mark.parametrize("layer_weight", (0.0, 1.0))
def test_teacher_runs_its_decoder_only_and_keeps_layer_states_only_for_the_layer_term(tiny, layer_weight):
    """The KL makes the teacher's logits itself: its LM head module never runs, and without the layer term the
    teacher is not asked for every layer's output; the loss equals the reference on the full logits."""
    teacher = copy.deepcopy(tiny).requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    head_calls, asked = [], []
    teacher.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    teacher.model.register_forward_pre_hook(lambda m, a, kw: asked.append(kw.get("output_hidden_states")),
                                            with_kwargs=True)
    ids = _ids()
    _, terms = DistillLoss(teacher, layer_weight=layer_weight)(tiny, tiny, ids)
    assert head_calls == [] and asked == [layer_weight > 0]
    with torch.no_grad():
        hs = tiny.model(input_ids=ids).last_hidden_state[:, :-1]
        ht = teacher.model(input_ids=ids).last_hidden_state[:, :-1]
        want = linear_kl_reference(hs, tiny.lm_head.weight, ht, teacher.lm_head.weight)
    assert _rel_err(terms["kl"], want) <= TOL[torch.float32]


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
