"""Fused linear + cross-entropy (CPU path and dispatch) against float64 F.cross_entropy(F.linear(h, W))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adapt_engine.kernels import linear_cross_entropy, linear_cross_entropy_reference, linear_cross_entropy_torch
from adapt_engine.kernels.linear_ce import CHUNK_ELEMS, ce_rows_torch, chunk_rows
from linear_ce_cases import CASES, TOL, assert_matches_truth, check_fp32_case, make_inputs, rel_err, run, truth
from torch.utils._python_dispatch import TorchDispatchMode

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("ignore", ("none", "some", "all"))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_equals_float64_truth(case, reduction, ignore):
    check_fp32_case(linear_cross_entropy, case, reduction, ignore)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[1:3], ids=str)
def test_dtypes_within_tolerance(case, dtype):
    lead, vocab, hidden, chunk = case
    h, w, t = make_inputs(lead, vocab, hidden, dtype, "some", seed=1)
    for reduction in ("mean", "none"):
        got = run(linear_cross_entropy, h, w, t, reduction, chunk=chunk)
        assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
        assert_matches_truth(got, truth(h, w, t, reduction), dtype, f"{case} {reduction}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tolerances_are_what_the_plain_path_reaches(dtype):
    """The plain unfused loss in the same dtype has errors of the same order (the tolerance is not loose)."""
    h, w, t = make_inputs((4, 16), 3001, 48, dtype, "some", seed=2)
    want = truth(h, w, t, "mean")

    def plain(hl, wl, tl, reduction):
        return F.cross_entropy(F.linear(hl, wl).float().view(-1, wl.shape[0]), tl.view(-1), reduction=reduction)

    fused_err = max(rel_err(g, x) for g, x in zip(run(linear_cross_entropy, h, w, t, "mean", chunk=5), want))
    plain_err = max(rel_err(g, x) for g, x in zip(run(plain, h, w, t, "mean"), want))
    assert fused_err <= TOL[dtype] and plain_err <= TOL[dtype]
    if dtype != torch.float32:  # 16-bit: the tolerance is within 10× of what the unfused loss reaches
        assert TOL[dtype] <= 10 * max(plain_err, fused_err), (plain_err, fused_err)


def test_fp32_equals_the_plain_loss_directly():
    h, w, t = make_inputs((3, 33), 2053, 40, torch.float32, "some", seed=3)
    got = run(linear_cross_entropy, h, w, t, "mean", chunk=10)

    def plain(hl, wl, tl, reduction):
        return F.cross_entropy(F.linear(hl, wl).view(-1, wl.shape[0]), tl.view(-1), reduction=reduction)

    want = run(plain, h, w, t, "mean")
    for g, x in zip(got, want):
        torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-7)


def test_weight_without_grad_gives_only_the_hidden_gradient():
    h, w, t = make_inputs((2, 8), 500, 16, torch.float32, "some")
    loss, gh, gw = run(linear_cross_entropy, h, w, t, "mean", want_w_grad=False, chunk=3)
    assert gw is None
    want = truth(h, w, t, "mean")
    assert rel_err(loss, want[0]) <= TOL[torch.float32] and rel_err(gh, want[1]) <= TOL[torch.float32]


def test_custom_ignore_index_that_is_a_class_id():
    h, w, t = make_inputs((20,), 50, 8, torch.float32, "none")
    t[::2] = 0
    got = run(linear_cross_entropy, h, w, t, "mean", ignore_index=0, chunk=6)
    assert_matches_truth(got, truth(h, w, t, "mean", ignore_index=0), torch.float32)


def test_all_ignored_and_empty_follow_torch():
    """mean over zero counted tokens is nan with zero gradients; sum is 0 (as F.cross_entropy)."""
    h, w, t = make_inputs((5,), 30, 4, torch.float32, "all")
    loss, gh, gw = run(linear_cross_entropy, h, w, t, "mean")
    assert torch.isnan(loss) and not gh.any() and not gw.any()
    h0, t0 = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long)
    assert torch.isnan(linear_cross_entropy(h0, w, t0))
    assert float(linear_cross_entropy(h0, w, t0, reduction="sum").detach()) == 0.0
    assert linear_cross_entropy(h0, w, t0, reduction="none").shape == (0,)


def test_tied_embedding_gets_both_gradients():
    """The LM head tied to the input embedding: its gradient sums the lookup's and the loss's."""
    gen = torch.Generator().manual_seed(4)
    emb = torch.randn(97, 12, generator=gen)
    ids = torch.randint(0, 97, (3, 11), generator=gen)
    targets = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], dim=1)
    mix = torch.randn(12, 12, generator=gen) / 4

    def loss_of(fn, e):
        hidden = torch.tanh(F.embedding(ids, e) @ mix)
        return fn(hidden, e, targets)

    e1 = emb.clone().requires_grad_()
    loss_of(lambda h, e, tg: linear_cross_entropy(h, e, tg, chunk=4), e1).backward()
    e2 = emb.double().requires_grad_()
    mix = mix.double()
    loss_of(lambda h, e, tg: F.cross_entropy(F.linear(h, e).view(-1, 97), tg.view(-1)), e2).backward()
    assert rel_err(e1.grad, e2.grad) <= TOL[torch.float32]


def test_autocast_casts_like_a_linear_layer():
    h, w, t = make_inputs((2, 10), 400, 32, torch.float32, "some", seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(linear_cross_entropy, h, w, t, "mean", chunk=7)

        def plain(hl, wl, tl, reduction):
            return F.cross_entropy(F.linear(hl, wl).float().view(-1, 400), tl.view(-1), reduction=reduction)

        want = run(plain, h, w, t, "mean")
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # back through the cast
    for g, x in zip(got, want):
        assert rel_err(g, x.double()) <= TOL[torch.bfloat16]



def test_autocast_takes_a_weight_already_in_its_dtype():
    """Under autocast a weight cast beforehand (calibration casts its frozen LM head once per batch) may meet a
    float32 hidden state: both end in bf16, so the result equals the call with the float32 weight."""
    h, w, t = make_inputs((2, 10), 400, 32, torch.float32, "some", seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = linear_cross_entropy(h, w, t, chunk=7)
        got = linear_cross_entropy(h, w.bfloat16(), t, chunk=7)
    assert float(got) == float(want)
    with pytest.raises(TypeError, match="call under torch.autocast"):  # outside autocast the mismatch is an error
        linear_cross_entropy(h, w.bfloat16(), t)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_row_kernel_scratch_buffer_changes_nothing(dtype):
    """16-bit chunks are reduced in a float32 scratch: a given (larger, reused) buffer gives the very same loss and
    logit gradient as one the kernel allocates."""
    gen = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(6, 301, generator=gen)).to(dtype)
    targets = torch.tensor([0, 5, -100, 300, 7, 7])
    scale = torch.full((6,), 0.2)
    own, shared = logits.clone(), logits.clone()
    loss_own = ce_rows_torch(own, targets, scale, -100)
    loss_shared = ce_rows_torch(shared, targets, scale, -100, work=torch.full((9, 301), float("nan")))
    assert torch.equal(loss_own, loss_shared) and torch.equal(own, shared)
    probs = torch.softmax(logits.float(), 1)
    probs[torch.arange(6), targets.clamp(min=0)] -= 1
    probs[2] = 0  # the ignored row
    torch.testing.assert_close(own.float(), (probs * 0.2).to(dtype).float(), rtol=0, atol=2e-3)

def test_no_grad_and_inference_give_the_loss_only():
    h, w, t = make_inputs((3, 7), 120, 8, torch.float32, "some")
    want = linear_cross_entropy_reference(h, w, t)
    with torch.no_grad():
        got = linear_cross_entropy(h.requires_grad_(), w, t, chunk=4)
    assert not got.requires_grad and rel_err(got, want) <= TOL[torch.float32]


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_never_materialises_the_full_logits():
    h, w, t = make_inputs((8, 32), 1000, 16, torch.float32, "some")
    h.requires_grad_()
    with _LargestTensor() as mode:
        linear_cross_entropy(h, w.requires_grad_(), t, chunk=16).backward()
    assert mode.largest <= 16 * 1000  # one chunk of logits; the full logits would be 256 × 1000
    assert chunk_rows(None, 49152) * 49152 <= CHUNK_ELEMS


def test_torch_path_and_dispatch_agree():
    h, w, t = make_inputs((2, 9), 333, 16, torch.float32, "some")
    a = run(linear_cross_entropy, h, w, t, "sum", chunk=5)
    b = run(linear_cross_entropy_torch, h, w, t, "sum", chunk=5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda h, w, t: (h, w[:, :-1], t), ValueError, "hidden size"),
        (lambda h, w, t: (h, w, t[:, :-1]), ValueError, "targets"),
        (lambda h, w, t: (h, w.double(), t), TypeError, "cast one"),
        (lambda h, w, t: (h, w, t.float()), TypeError, "integer"),
        (lambda h, w, t: (h, w, t.fill_(50)), ValueError, "outside the vocabulary"),
        (lambda h, w, t: (h, w[0], t), ValueError, "2-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    h, w, t = make_inputs((2, 3), 50, 8, torch.float32, "none")
    with pytest.raises(error, match=match):
        linear_cross_entropy(*change(h, w, t))


def test_bad_reduction_and_chunk():
    h, w, t = make_inputs((2, 3), 50, 8, torch.float32, "none")
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, t, chunk=0)


# -- the head in vocabulary chunks (streamed pruning's loss: linear_cross_entropy_vocab_chunks) --------------------
def _vocab_chunks_case(dtype, seed=0, n=29, vocab=211, hidden=24):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 2).to(dtype)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[[2, 7]] = -100
    return h, w, t


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows", [1, 50, 211, 500])
def test_vocab_chunks_match_the_whole_head(dtype, tol, rows):
    from adapt_engine.kernels import linear_cross_entropy_vocab_chunks

    h, w, t = _vocab_chunks_case(dtype)
    scale = torch.rand(t.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss, grad = linear_cross_entropy_vocab_chunks(h, w.split(rows), t, scale, chunk=7)
    leaf = h.double().requires_grad_(True)
    want = linear_cross_entropy_reference(leaf, w.double(), t, reduction="none")
    (want * scale).sum().backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and grad.dtype == dtype
    assert loss[[2, 7]].eq(0).all() and grad[[2, 7]].eq(0).all()
    assert rel_err(loss.double(), want.detach()) < tol
    assert rel_err(grad.double(), leaf.grad) < tol
    loss_only, none = linear_cross_entropy_vocab_chunks(h, iter(w.split(rows)), t, chunk=7)
    assert none is None and torch.equal(loss_only, loss)


def test_vocab_chunks_under_autocast_and_bad_input():
    from adapt_engine.kernels import linear_cross_entropy_vocab_chunks

    h, w, t = _vocab_chunks_case(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad = linear_cross_entropy_vocab_chunks(h, w.split(64), t, torch.ones(t.shape))
    want, _ = linear_cross_entropy_vocab_chunks(h.bfloat16(), w.bfloat16().split(64), t)
    assert torch.equal(loss, want) and grad.dtype == torch.float32  # cast like nn.Linear; gradient in h's dtype
    t[0] = 211
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy_vocab_chunks(h, w.split(64), t)
    with pytest.raises(ValueError, match="head chunk"):
        linear_cross_entropy_vocab_chunks(h, [w[:, :5]], t)
    closed = []

    def chunks():
        try:
            yield w[:10, :5]
        finally:
            closed.append(True)

    with pytest.raises(ValueError, match="head chunk"):
        linear_cross_entropy_vocab_chunks(h, chunks(), t)
    assert closed == [True]  # the chunk reader is released when the loss fails
