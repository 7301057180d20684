"""group_saliency: C++ backend and torch reference against float64 ground truth."""

from __future__ import annotations

import pytest
import torch
from adapt_engine.kernels import (
    backend_for,
    finalize_saliency,
    group_saliency,
    group_saliency_reference,
)
from kernel_cases import LAYOUTS, assert_scores_close, make_matrix, saliency_truth

METRICS = ("taylor", "vectorize", "magnitude", "param_mix")
IMPLS = {"dispatch": group_saliency, "reference": group_saliency_reference}
# Odd sizes around the vector widths and the threads' split points, single rows/columns,
# and a very wide matrix (splits the long rows across threads).
SHAPES = ((1, 1), (1, 257), (257, 1), (37, 45), (64, 129), (3, 4099), (130, 2), (2, 40000))
# Every layout in fp32 (each takes a different C++ path); the 16-bit types on the layouts that
# parameters really have, plus one odd one each.
DTYPE_LAYOUTS = [(torch.float32, layout) for layout in LAYOUTS] + [
    (torch.bfloat16, "contiguous"), (torch.bfloat16, "transposed"), (torch.bfloat16, "sliced"),
    (torch.float16, "contiguous"), (torch.float16, "offset"),
]


def _inputs(shape, dtype, layout, metric, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = make_matrix(shape, dtype, layout, gen)
    g = make_matrix(shape, dtype, layout, gen)
    f = make_matrix(shape, torch.float32, layout, gen).abs_() if metric == "param_mix" else None
    return w, g, f


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype, layout", DTYPE_LAYOUTS, ids=str)
@pytest.mark.parametrize("dim", (0, 1))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_truth(impl, metric, layout, dtype, dim, shape):
    w, g, f = _inputs(shape, dtype, layout, metric)
    f0 = None if f is None else f.clone()
    got = IMPLS[impl](w, g, dim, 1, metric, fisher=f, fisher_scale=0.7)
    want, scale = saliency_truth(w, g, f0, dim, 1, metric, 0.7)
    assert_scores_close(got, want, scale, dtype)
    if f is not None:  # the Fisher sum was updated in place, exactly once per element
        torch.testing.assert_close(f, f0 + g.float() ** 2, rtol=1e-6, atol=1e-6)


# Each C++ split at realistic sizes: row reductions; column scores over row blocks (many rows)
# and over blocks of columns (few, very wide rows); 16-bit spans with a partial last block.
THREAD_SHAPES = ((300, 1000), (1000, 300), (5, 40001))


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("metric", ("taylor", "vectorize", "magnitude"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("dim", (0, 1))
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=str)
def test_every_split_and_thread_count(shape, dim, dtype, metric, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w, g, _ = _inputs(shape, dtype, "contiguous", metric, seed=threads)
        got = group_saliency(w, g, dim, 1, metric)
        want, scale = saliency_truth(w, g, None, dim, 1, metric)
        assert_scores_close(got, want, scale, dtype)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("group_size", (2, 3, 64))
@pytest.mark.parametrize("dim", (0, 1))
def test_group_sizes(impl, metric, group_size, dim):
    shape = (192, 96) if dim == 0 else (96, 192)
    w, g, f = _inputs(shape, torch.bfloat16, "contiguous", metric, seed=group_size)
    f0 = None if f is None else f.clone()
    got = IMPLS[impl](w, g, dim, group_size, metric, fisher=f)
    assert got.shape == (192 // group_size,)
    want, scale = saliency_truth(w, g, f0, dim, group_size, metric)
    assert_scores_close(got, want, scale, torch.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", METRICS)
def test_out_accumulates_a_coupled_head_group(impl, metric):
    """q/k rows and o columns of 3 heads of size 8 add into one score vector per head."""
    gen = torch.Generator().manual_seed(3)
    q, k, o = (torch.randn(s, generator=gen) for s in ((24, 40), (24, 40), (40, 24)))
    gq, gk, go = (torch.randn(s, generator=gen) for s in ((24, 40), (24, 40), (40, 24)))
    fisher = {name: torch.zeros(t.shape) if metric == "param_mix" else None for name, t in
              (("q", q), ("k", k), ("o", o))}
    acc = torch.zeros(3)
    fn = IMPLS[impl]
    fn(q, gq, 0, 8, metric, out=acc, fisher=fisher["q"])
    fn(k, gk, 0, 8, metric, out=acc, fisher=fisher["k"])
    ret = fn(o, go, 1, 8, metric, out=acc, fisher=fisher["o"])
    assert ret is acc
    finalize_saliency(acc, metric)
    # Ground truth on the whole group at once: for 'vectorize' |Σ| spans all three matrices.
    w_all = torch.cat([q, k, o.t()], dim=1)
    g_all = torch.cat([gq, gk, go.t()], dim=1)
    f_all = torch.zeros(w_all.shape) if metric == "param_mix" else None
    want, scale = saliency_truth(w_all, g_all, f_all, 0, 8, metric)
    assert_scores_close(acc, want, scale, torch.float32)


def test_vectorize_abs_is_over_the_whole_group():
    """Adding per-matrix |Σ| would be wrong: two matrices whose signed sums cancel score ~0."""
    w = torch.ones(4, 4)
    g = torch.ones(4, 4)
    acc = torch.zeros(2)
    group_saliency(w, g, 0, 2, "vectorize", out=acc)
    group_saliency(w, -g, 0, 2, "vectorize", out=acc)
    assert torch.equal(finalize_saliency(acc, "vectorize"), torch.zeros(2))
    single = group_saliency(w, -g, 0, 2, "vectorize")
    assert torch.equal(single, torch.full((2,), 8.0))


@pytest.mark.parametrize("impl", IMPLS)
def test_param_mix_fisher_runs_over_calls(impl):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 32, generator=gen)
    grads = [torch.randn(16, 32, generator=gen) for _ in range(3)]
    fisher = torch.zeros(16, 32)
    for g in grads:
        got = IMPLS[impl](w, g, 0, 4, "param_mix", fisher=fisher, fisher_scale=1 / 3)
    f_sum = sum(g * g for g in grads)
    torch.testing.assert_close(fisher, f_sum)
    # The last call scores with the running sum scaled by fisher_scale (here: the mean).
    want, scale = saliency_truth(w, grads[-1], f_sum - grads[-1] ** 2, 0, 4, "param_mix", 1 / 3)
    assert_scores_close(got, want, scale, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_and_magnitude_without_grad(impl):
    gen = torch.Generator().manual_seed(6)
    bias = torch.randn(12, generator=gen).to(torch.bfloat16)
    got = IMPLS[impl](bias, None, 0, 4, "magnitude")
    torch.testing.assert_close(got, bias.float().abs().view(3, 4).sum(1))
    gb = torch.randn(12, generator=gen).to(torch.bfloat16)
    got = IMPLS[impl](bias, gb, -1, 3, "taylor")
    torch.testing.assert_close(got, (bias.float() * gb.float()).abs().view(4, 3).sum(1))


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_weight_and_grad_dtypes(impl):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(33, 65, generator=gen).to(torch.bfloat16)
    g = torch.randn(33, 65, generator=gen)
    for dim in (0, 1):
        want, scale = saliency_truth(w, g, None, dim, 1, "taylor")
        assert_scores_close(IMPLS[impl](w, g, dim), want, scale, torch.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_out_is_added_into(impl):
    w, g, _ = _inputs((20, 10), torch.float32, "contiguous", "taylor")
    backing = torch.ones(40)
    out = backing[::2]
    IMPLS[impl](w, g, 0, 1, "taylor", out=out)
    want, scale = saliency_truth(w, g, None, 0, 1, "taylor")
    assert_scores_close(out - 1, want, scale, torch.float32)
    assert torch.equal(backing[1::2], torch.ones(20))


def test_runs_from_a_post_accumulate_grad_hook():
    """Gradients are reduced to scores as soon as they exist, then may be freed."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 32)
    acc = torch.zeros(4)
    seen = []

    def hook(p):
        group_saliency(p, p.grad, 0, 8, "taylor", out=acc)
        seen.append(p.grad.clone())
        p.grad = None

    lin.weight.register_post_accumulate_grad_hook(hook)
    for _ in range(2):
        lin(torch.randn(5, 48)).square().sum().backward()
    assert lin.weight.grad is None and len(seen) == 2
    want = sum(saliency_truth(lin.weight.detach(), g, None, 0, 8, "taylor")[0] for g in seen)
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-6)


def test_dispatch_backend_names(monkeypatch):
    t = torch.zeros(3)
    assert backend_for(t) in ("cpp", "torch")
    monkeypatch.setenv("ADAPT_ENGINE_DISABLE_CPP", "1")
    assert backend_for(t) == "torch"
    w, g, _ = _inputs((9, 7), torch.float32, "contiguous", "taylor")
    want, scale = saliency_truth(w, g, None, 1, 1, "taylor")
    assert_scores_close(group_saliency(w, g, 1), want, scale, torch.float32)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(metric="fisher"), ValueError, "unknown metric"),
        (dict(group_size=5), ValueError, "not divisible by group_size=5"),
        (dict(group_size=0), ValueError, "positive int"),
        (dict(dim=2), ValueError, "dim=2 is invalid"),
        (dict(grad=None), ValueError, "needs grad"),
        (dict(grad=torch.zeros(6, 4)), ValueError, "grad shape"),
        (dict(grad=torch.zeros(4, 6, dtype=torch.int32)), TypeError, "grad has dtype"),
        (dict(metric="param_mix"), ValueError, "needs fisher="),
        (dict(metric="param_mix", fisher=torch.zeros(4, 6, dtype=torch.float16)), TypeError, "float32"),
        (dict(fisher=torch.zeros(4, 6)), ValueError, "only used by metric 'param_mix'"),
        (dict(out=torch.zeros(3)), ValueError, "must hold 4 scores"),
        (dict(out=torch.zeros(4, dtype=torch.float64)), TypeError, "1-D float32"),
        (dict(weight=torch.zeros(2, 2, 2)), ValueError, "1-D .* or 2-D"),
        (dict(weight=torch.zeros(4, 6, dtype=torch.int64)), TypeError, "weight has dtype"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_raise_clear_errors(impl, kwargs, error, match):
    args = dict(weight=torch.zeros(4, 6), grad=torch.zeros(4, 6), dim=0, group_size=1, metric="taylor")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        IMPLS[impl](**args)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_every_16_bit_pattern_converts_exactly(dtype):
    """The kernels' own bit-level bf16/fp16 -> fp32 conversions, on all 65536 inputs (incl. inf/NaN)."""
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    got = group_saliency(x, None, 0, 1, "magnitude")
    want = x.float().abs()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])
