"""gather_channels: in-place compaction (C++ backend and torch reference) against index_select."""

from __future__ import annotations

import pytest
import torch
from adapt_engine.kernels import gather_channels, gather_channels_reference
from adapt_engine.kernels.gather import first_moved_item, plan_chunks, split_layout
from kernel_cases import INDEX_MODES, fill, random_index

IMPLS = {"dispatch": gather_channels, "reference": gather_channels_reference}
# (9, 13, 2) along dim 1 moves 2-element items (4 bytes for bf16, 8 for fp32) as one unit.
SHAPES = ((1,), (1000,), (1, 1), (1, 50), (50, 1), (37, 45), (5, 6, 7), (9, 13, 2), (3, 20001))
# Large enough (4.8 MB in fp32) for every step of the C++ plan: single-thread steps while the
# gap is small, direct chunks split by bytes (rows) or by items (columns), and bounce-buffer
# chunks (keeping almost all columns).
LARGE_SHAPES = ((1200, 1000), (1000, 1200))
LARGE_MODES = ("half", "almost_all", "runs", "every_other", "last")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float64, torch.bool)


def _check(impl, shape, dim, dtype, mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = fill(shape, dtype, gen)
    d = 0 if len(shape) == 1 else dim
    idx = random_index(shape[d], mode, gen)
    want = t.index_select(d, torch.tensor(idx, dtype=torch.long))
    work = t.clone()
    (got,) = IMPLS[impl]([work], idx, dim)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want), f"{impl} {shape} dim={dim} {dtype} {mode}"
    assert got.untyped_storage().data_ptr() == work.untyped_storage().data_ptr()
    return got


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", INDEX_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_index_select_every_dim(impl, mode, dtype, shape):
    for dim in range(len(shape)):
        _check(impl, shape, dim, dtype, mode)


# The reference is slow on big column gathers; two patterns cover its chunking.
LARGE_CASES = [("dispatch", m) for m in LARGE_MODES] + [("reference", m) for m in ("half",)]


@pytest.mark.parametrize("impl, mode", LARGE_CASES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("dim", (0, 1))
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
@pytest.mark.parametrize("threads", (1, 2))
def test_matches_index_select_large(impl, mode, dtype, dim, shape, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(impl, shape, dim, dtype, mode, seed=dim)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ("half", "runs", "first_dropped"))
def test_wide_items_of_a_3d_tensor_across_threads(mode):
    """Several slabs of wide items: the byte-sliced multi-thread path with A > 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dim in range(3):
            _check("dispatch", (4, 300, 300), dim, torch.float32, mode)
    finally:
        torch.set_num_threads(before)


def test_tensors_may_come_from_a_generator():
    t = torch.arange(12.0).reshape(3, 4)
    (got,) = gather_channels((x for x in [t]), torch.tensor([1, 3]), 1)
    assert torch.equal(got, torch.tensor([[1.0, 3.0], [5.0, 7.0], [9.0, 11.0]]))


@pytest.mark.parametrize("impl", IMPLS)
def test_many_random_index_sets(impl):
    gen = torch.Generator().manual_seed(11)
    for trial in range(60):
        rows = int(torch.randint(1, 90, (1,), generator=gen))
        cols = int(torch.randint(1, 90, (1,), generator=gen))
        dim = trial % 2
        n = (rows, cols)[dim]
        keep = torch.rand(n, generator=gen) < torch.rand(1, generator=gen)
        idx = torch.nonzero(keep).flatten()
        t = torch.randn(rows, cols, generator=gen)
        (got,) = IMPLS[impl]([t.clone()], idx, dim)
        assert torch.equal(got, t.index_select(dim, idx))


@pytest.mark.parametrize("impl", IMPLS)
def test_coupled_parameter_grad_and_adam_state(impl):
    """Weight rows, bias, gradient and AdamW moments of one layer in one call."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 24)
    lin(torch.randn(3, 16)).sum().backward()
    opt = torch.optim.AdamW(lin.parameters())
    opt.step()
    state = opt.state[lin.weight]
    before = [lin.weight.detach().clone(), lin.bias.detach().clone(), lin.weight.grad.clone(),
              state["exp_avg"].clone(), state["exp_avg_sq"].clone()]
    idx = torch.tensor([0, 3, 4, 5, 17, 23])
    tensors = [lin.weight.data, lin.bias, lin.weight.grad, state["exp_avg"], state["exp_avg_sq"]]
    out = IMPLS[impl](tensors, idx, 0)
    for got, old in zip(out, before, strict=True):
        assert torch.equal(got, old[idx])
        assert not got.requires_grad
    lin.weight.data, lin.bias.data, lin.weight.grad = out[0], out[1], out[2]
    state["exp_avg"], state["exp_avg_sq"] = out[3], out[4]
    assert lin(torch.randn(2, 16)).shape == (2, 6)


@pytest.mark.parametrize("impl", IMPLS)
def test_transposed_view_is_gathered_through_its_base(impl):
    base = torch.randn(30, 20)
    view = base.t()  # (20, 30), column-major
    want = view.index_select(1, torch.tensor([1, 2, 9, 29]))
    (got,) = IMPLS[impl]([view], [1, 2, 9, 29], 1)
    assert torch.equal(got, want)
    assert got.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


@pytest.mark.parametrize("impl", IMPLS)
def test_shrink_reallocates_compact_storage(impl):
    t = torch.randn(64, 32)
    want = t[:, ::2].clone()
    (got,) = IMPLS[impl]([t], range(0, 32, 2), 1, shrink=True)
    assert torch.equal(got, want)
    assert got.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert got.untyped_storage().nbytes() == want.numel() * 4


@pytest.mark.parametrize("impl", IMPLS)
def test_default_keeps_full_storage(impl):
    t = torch.randn(64, 32)
    (got,) = IMPLS[impl]([t], [5], 0)
    assert got.shape == (1, 32)
    assert got.untyped_storage().nbytes() == 64 * 32 * 4


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_index_gives_zero_size_views(impl):
    out = IMPLS[impl]([torch.randn(4, 5), torch.randn(4)], [], 0)
    assert [o.shape for o in out] == [(0, 5), (0,)]
    assert IMPLS[impl]([], [1], 0) == []


@pytest.mark.parametrize("impl", IMPLS)
def test_storage_offset_view_is_compacted_in_its_own_range(impl):
    backing = torch.arange(100.0)
    view = backing[10:40].view(5, 6)
    (got,) = IMPLS[impl]([view], [0, 2], 1)
    assert torch.equal(got, torch.arange(10.0, 40.0).view(5, 6)[:, [0, 2]])
    assert torch.equal(backing[:10], torch.arange(10.0))
    assert torch.equal(backing[40:], torch.arange(40.0, 100.0))


@pytest.mark.parametrize(
    "tensors, index, dim, error, match",
    [
        ([torch.zeros(4, 4)], [2, 1], 0, ValueError, "not sorted"),
        ([torch.zeros(4, 4)], [1, 1], 0, ValueError, "repeated"),
        ([torch.zeros(4, 4)], [-1, 2], 0, ValueError, "negative"),
        ([torch.zeros(4, 4)], [0, 4], 1, ValueError, "out of range"),
        ([torch.zeros(4, 4)], [0.5], 0, TypeError, "integer"),
        ([torch.zeros(4, 4)], torch.tensor([0.0, 1.0]), 0, TypeError, "integers"),
        ([torch.zeros(4, 4)], torch.tensor([[0, 1]]), 0, ValueError, "1-D"),
        ([torch.zeros(4, 4)], [0], 2, ValueError, "dim=2 is out of range"),
        ([torch.zeros(4, 8)[:, ::2]], [0], 0, ValueError, "not contiguous"),
        ([torch.zeros(())], [0], 0, ValueError, "0-d"),
        (torch.zeros(4, 4), [0], 0, TypeError, "list of tensors"),
        (["w"], [0], 0, TypeError, "not a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_raise_clear_errors(impl, tensors, index, dim, error, match):
    with pytest.raises(error, match=match):
        IMPLS[impl](tensors, index, dim)


@pytest.mark.parametrize("impl", IMPLS)
def test_overlapping_tensors_are_rejected_before_any_change(impl):
    w = torch.randn(6, 4)
    keep = w.clone()
    with pytest.raises(ValueError, match="overlap"):
        IMPLS[impl]([w, w.view(24)[:8].view(2, 4)], [0, 1], 0)
    assert torch.equal(w, keep)


@pytest.mark.parametrize("impl", IMPLS)
def test_index_out_of_range_for_a_later_tensor_changes_nothing(impl):
    """Every tensor is checked before the first one is compacted."""
    w, b = torch.randn(8, 3), torch.randn(6)
    w0, b0 = w.clone(), b.clone()
    with pytest.raises(ValueError, match=r"out of range for tensors\[1\]"):
        IMPLS[impl]([w, b], [1, 7], 0)
    assert torch.equal(w, w0) and torch.equal(b, b0)


def test_chunk_plan_is_safe_and_complete():
    """Direct chunks never read what they write; chunks tile every moved item exactly once."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(300):
        a = int(torch.randint(1, 6, (1,), generator=gen))
        n = int(torch.randint(1, 40, (1,), generator=gen))
        keep = torch.rand(n, generator=gen) < torch.rand(1, generator=gen)
        idx = torch.nonzero(keep).flatten()
        bounce = int(torch.randint(1, 12, (1,), generator=gen))
        chunks = plan_chunks(a, n, idx, bounce)
        k = idx.numel()
        if k in (0, n):
            assert chunks == []
            continue
        start = first_moved_item(idx, a, k)
        pos = start
        for i0, i1, direct in chunks:
            assert i0 == pos and i1 > i0
            if direct:
                lowest_read = (i0 // k) * n + int(idx[i0 % k])
                assert lowest_read >= i1
            else:
                assert i1 - i0 <= bounce
            pos = i1
        assert pos == a * k or (start == a * k and not chunks)


def test_split_layout():
    assert split_layout(torch.zeros(2, 3, 4, 5), 1) == (2, 3, 20)
    assert split_layout(torch.zeros(7), 0) == (1, 7, 1)
