"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors (run by test_kernel_triton_interpret.py).

Not collected by the main test run (the name does not match test_*.py): the interpreter must be
switched on before triton is imported, so these run in a child pytest process.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
triton = pytest.importorskip("triton")

import torch  # noqa: E402
from adapt_engine.kernels.gather import check_index  # noqa: E402
from adapt_engine.kernels.gather_triton import gather_inplace_triton  # noqa: E402
from adapt_engine.kernels.saliency import check_saliency_args, run_saliency  # noqa: E402
from adapt_engine.kernels.saliency_triton import accumulate_saliency_triton  # noqa: E402
from kernel_cases import (  # noqa: E402
    INDEX_MODES,
    LAYOUTS,
    assert_scores_close,
    fill,
    make_matrix,
    random_index,
    saliency_truth,
)

METRICS = ("taylor", "vectorize", "magnitude", "param_mix")
# Small: the interpreter runs each program in numpy. Odd sizes straddle the tile edges
# (8×512 row tiles, 128×32 column tiles) and force several programs and reduction splits.
SHAPES = ((1, 1), (1, 700), (13, 1), (37, 45), (130, 33), (9, 1100))
# Every layout in fp32, the 16-bit types on the layouts parameters really have.
DTYPE_LAYOUTS = [(torch.float32, layout) for layout in LAYOUTS] + [
    (torch.bfloat16, "contiguous"), (torch.float16, "transposed"), (torch.bfloat16, "offset")]


def _triton_saliency(w, g, dim, group_size, metric, out=None, fisher=None, fisher_scale=1.0):
    args = check_saliency_args(w, g, dim, group_size, metric, out, fisher, fisher_scale)
    return run_saliency(args, out, accumulate_saliency_triton)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype, layout", DTYPE_LAYOUTS, ids=str)
@pytest.mark.parametrize("dim", (0, 1))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_saliency_kernel(metric, layout, dtype, dim, shape):
    gen = torch.Generator().manual_seed(1)
    w = make_matrix(shape, dtype, layout, gen)
    g = make_matrix(shape, dtype, layout, gen)
    f = make_matrix(shape, torch.float32, layout, gen).abs_() if metric == "param_mix" else None
    f0 = None if f is None else f.clone()
    got = _triton_saliency(w, g, dim, 1, metric, fisher=f, fisher_scale=0.5)
    want, scale = saliency_truth(w, g, f0, dim, 1, metric, 0.5)
    assert_scores_close(got, want, scale, dtype)
    if f is not None:
        torch.testing.assert_close(f, f0 + g.float() ** 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim", (0, 1))
def test_saliency_groups_and_out(metric, dim):
    gen = torch.Generator().manual_seed(2)
    shape = (48, 20) if dim == 0 else (20, 48)
    w = torch.randn(shape, generator=gen).to(torch.bfloat16)
    g = torch.randn(shape, generator=gen).to(torch.bfloat16)
    f = torch.zeros(shape) if metric == "param_mix" else None
    out = torch.ones(4)
    _triton_saliency(w, g, dim, 12, metric, out=out, fisher=f)
    want, scale = saliency_truth(w, g, torch.zeros(shape), dim, 12, metric)
    if metric == "vectorize":  # out= holds the signed sums until finalize_saliency
        t = (w.double() * g.double()).sum(1 - dim).view(4, 12).sum(1)
        want = t
    assert_scores_close(out - 1, want, scale, torch.bfloat16)


def test_saliency_bias():
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(40, generator=gen).to(torch.float16)
    got = _triton_saliency(b, None, 0, 8, "magnitude")
    torch.testing.assert_close(got, b.float().abs().view(5, 8).sum(1))


GATHER_SHAPES = ((1,), (300,), (1, 1), (37, 45), (45, 37), (5, 6, 7), (3, 700))


def _gather_case(shape, dtype, mode, bounce_bytes, seed=4):
    gen = torch.Generator().manual_seed(seed)
    for dim in range(len(shape)):
        t = fill(shape, dtype, gen)
        idx = check_index(random_index(shape[dim], mode, gen))
        want = t.index_select(dim, idx)
        work = t.clone()
        gather_inplace_triton(work, idx, dim, bounce_bytes=bounce_bytes)
        got = work.view(-1)[: want.numel()].view(want.shape)
        assert torch.equal(got, want), f"{shape} dim={dim} {mode}"


@pytest.mark.parametrize("bounce_bytes", (64, 1 << 20))
@pytest.mark.parametrize("mode", INDEX_MODES)
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=str)
def test_gather_kernel(bounce_bytes, mode, shape):
    """64 bytes forces many direct and bounce chunks; 1 MiB means a single bounce chunk."""
    _gather_case(shape, torch.float32, mode, bounce_bytes)


@pytest.mark.parametrize("mode", ("half", "almost_all", "runs"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.int8, torch.float64, torch.bool), ids=str)
def test_gather_kernel_dtypes(mode, dtype):
    _gather_case((13, 17), dtype, mode, bounce_bytes=32)


@pytest.mark.parametrize("mode", ("half", "first_dropped", "every_other"))
def test_gather_kernel_one_item_bounce(mode):
    """A bounce buffer of a single item: the smallest chunks the planner can make."""
    _gather_case((9, 11), torch.float32, mode, bounce_bytes=1)
