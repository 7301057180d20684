"""Shared cases and float64 checks of the fused linear + cross-entropy (imported by the test modules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Worst error allowed, relative to the largest magnitude of the float64 truth (loss, grad wrt hidden,
# grad wrt weight). fp32: products and sums rounded in fp32. bf16/fp16: the logits themselves are
# rounded to the input dtype by the matmul (as in F.linear in that dtype) and the gradients are
# stored in it. Worst errors reached over these cases (fused / plain F.cross_entropy(F.linear(h, W)
# .float(), t) in the same dtype): fp32 2.8e-6 / 7.5e-7, bf16 8.0e-3 / 6.2e-3, fp16 8.5e-4 / 8.2e-4;
# test_tolerances_are_what_the_plain_path_reaches keeps the 16-bit tolerances within 10x of that.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# (lead shape of hidden, vocab, hidden size, chunk): one token; a vocab that is not a multiple of
# anything; token counts that are not multiples of the chunk; the default chunk.
CASES = [
    ((1,), 7, 5, None),
    ((3, 5), 1000, 16, 7),
    ((2, 9), 2053, 24, 8),
    ((4, 9), 300, 24, None),
    ((13,), 65, 8, 1),
]


def make_inputs(lead, vocab, hidden, dtype, ignore: str, seed: int = 0, ignore_index: int = -100):
    """hidden (scaled so logits are O(1..10)), weight, targets with the ignore pattern applied."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * (3.0 / hidden**0.5)).to(dtype)
    t = torch.randint(0, vocab, lead, generator=gen)
    if ignore == "some":
        t.view(-1)[::3] = ignore_index
    elif ignore == "all":
        t.fill_(ignore_index)
    return h, w, t


def truth(h, w, t, reduction: str, ignore_index: int = -100):
    """(loss, grad wrt h, grad wrt w) of F.cross_entropy(F.linear(h, w), t) in float64."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = F.cross_entropy(F.linear(h64, w64).view(-1, w.shape[0]), t.view(-1), ignore_index=ignore_index,
                           reduction=reduction)
    if reduction == "none":
        loss = loss.view(t.shape)
    seed = _upstream(loss)
    loss.backward(seed)
    return loss.detach(), h64.grad, w64.grad


def _upstream(loss: torch.Tensor) -> torch.Tensor:
    """A fixed, non-trivial incoming gradient (checks that backward scales by it)."""
    if loss.dim() == 0:
        return torch.tensor(0.75, dtype=loss.dtype)
    return torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)


def run(fn, h, w, t, reduction: str, want_w_grad: bool = True, **kw):
    """(loss, grad wrt h, grad wrt w or None) of a linear_cross_entropy implementation."""
    hl = h.detach().clone().requires_grad_()
    wl = w.detach().clone().requires_grad_(want_w_grad)
    loss = fn(hl, wl, t, reduction=reduction, **kw)
    loss.backward(_upstream(loss.detach().double()).to(loss.dtype))
    return loss.detach(), hl.grad, wl.grad


def rel_err(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """Worst absolute error relative to the largest magnitude of the truth (nan-aware: both nan is 0)."""
    assert got is not None and got.shape == want.shape, (None if got is None else got.shape, want.shape)
    g, w = got.double(), want
    both_nan = torch.isnan(g) & torch.isnan(w)
    assert torch.equal(torch.isnan(g), torch.isnan(w)), "nan pattern differs"
    diff = (g - w).abs().masked_fill(both_nan, 0.0)
    scale = w.abs().masked_fill(both_nan, 0.0).max() if w.numel() else torch.tensor(0.0)
    return float(diff.max() / (scale + 1e-30)) if w.numel() else 0.0


def check_fp32_case(fn, case, reduction: str, ignore: str) -> None:
    """``fn`` (a fused-loss implementation) on one fp32 case equals the float64 truth within tolerance."""
    lead, vocab, hidden, chunk = case
    h, w, t = make_inputs(lead, vocab, hidden, torch.float32, ignore)
    got = run(fn, h, w, t, reduction, chunk=chunk)
    assert_matches_truth(got, truth(h, w, t, reduction), torch.float32, f"{case} {reduction} {ignore}")


def assert_matches_truth(got, want, dtype, label: str = "") -> None:
    """Loss and both gradients within the dtype's tolerance of the float64 truth."""
    for name, g, w in zip(("loss", "grad hidden", "grad weight"), got, want):
        if g is None and name == "grad weight":
            continue
        err = rel_err(g, w)
        assert err <= TOL[dtype], f"{label} {name}: relative error {err:.3g} > {TOL[dtype]:g} ({dtype})"
