"""In-place channel gathering: argument checks, chunk planning and the plain-torch reference.

``gather_channels(tensors, index, dim)`` keeps the slices ``index`` (sorted, unique, in range)
of every tensor along ``dim`` (1-D tensors along their only dim), moving them to the front of
the tensor's own storage, and returns views of the new shape on that storage.

Layout model shared by every backend: a contiguous tensor is (A, N, B) = (outer slabs,
channels along dim, trailing elements). Item i = a·K + k (slab a, k-th kept channel) moves from
position src(i) = a·N + index[k] to position i, in units of B elements. gap(i) = src(i) − i is
never negative and never decreases, hence:
- ascending order is safe in place, and
- a chunk [i0, i1) with gap(i0) ≥ i1 − i0 only reads positions ≥ i1, so it can be copied
  fully in parallel ("direct"); other chunks go through a bounded bounce buffer.

Memory: nothing is returned to the allocator by default; the storage keeps its full size and
the tail beyond the kept elements is unused until the last reference to the storage is dropped.
With ``shrink=True`` each result is cloned into compact storage (one kept-size copy per
tensor); the old full-size storage is freed once the caller drops its other references (e.g.
after ``param.data = new``). An empty index is allowed and gives zero-size views.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# The reference path copies at most this many bytes per chunk through its temporary.
REFERENCE_CHUNK_BYTES = 1 << 20
# ... and at most this many items, so its int64 index temporaries stay small too.
REFERENCE_CHUNK_ITEMS = 1 << 16


def _is_cpu_long(index) -> bool:
    """True for a contiguous 1-D int64 CPU tensor without grad: usable as an index with no copy."""
    return (
        type(index) is torch.Tensor and index.dtype == torch.int64 and index.device.type == "cpu"
        and index.dim() == 1 and index.is_contiguous() and not index.requires_grad
    )


def _as_index(index: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if _is_cpu_long(index):  # the common case, without a copy
        return index
    if isinstance(index, torch.Tensor):
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"gather_channels: index must hold integers, got dtype {index.dtype}")
        if index.dim() != 1:
            raise ValueError(f"gather_channels: index must be 1-D, got shape {tuple(index.shape)}")
        return index.detach().to(device="cpu", dtype=torch.int64).contiguous()
    try:
        values = [int(i) for i in index]
        if any(isinstance(i, (bool, float)) for i in index):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError("gather_channels: index must be a 1-D integer tensor or a sequence of ints") from None
    return torch.tensor(values, dtype=torch.int64)


def check_index(index: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Validate that index is 1-D, integer, sorted and unique; return it as int64 on CPU."""
    idx = _as_index(index)  # a CPU int64 tensor passes through without a copy
    a = idx.numpy()  # shares memory; numpy's small-array ops cost a fraction of torch's
    if a.size > 1 and not (a[1:] > a[:-1]).all():
        j = int(np.flatnonzero(a[1:] <= a[:-1])[0])
        what = "repeated" if a[j] == a[j + 1] else "not sorted"
        raise ValueError(
            f"gather_channels: index must be sorted and unique, but it is {what} at positions {j}, "
            f"{j + 1} ({a[j]}, {a[j + 1]}); pass torch.unique(index) (which also sorts)"
        )
    if a.size and a[0] < 0:
        raise ValueError(f"gather_channels: index holds a negative entry {a[0]}; use indices in [0, size)")
    return idx


def canonical_layout(t: torch.Tensor, dim: int, pos: int) -> tuple[torch.Tensor, int, bool]:
    """Return (contiguous view, dim to gather in it, transposed?) for a tensor of gather_channels."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"gather_channels: tensors[{pos}] is a {type(t).__name__}, not a torch.Tensor")
    if t.requires_grad or type(t) is not torch.Tensor:
        t = t.detach()  # nn.Parameter or autograd leaf: edit the data, not the graph
    if t.dim() == 0:
        raise ValueError(f"gather_channels: tensors[{pos}] is a 0-d tensor; there is no channel to gather")
    if t.dim() == 1:
        d = 0
    else:
        if isinstance(dim, bool) or not isinstance(dim, int) or not -t.dim() <= dim < t.dim():
            raise ValueError(f"gather_channels: dim={dim!r} is out of range for tensors[{pos}] of shape "
                             f"{tuple(t.shape)}")
        d = dim % t.dim()
    if t.is_contiguous():
        return t, d, False
    if t.dim() == 2 and t.t().is_contiguous():  # a transposed view: gather the other axis of its base
        return t.t(), 1 - d, True
    raise ValueError(
        f"gather_channels: tensors[{pos}] (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous; "
        "in-place compaction needs a contiguous (or transposed 2-D) tensor, e.g. call .contiguous() first"
    )


def check_list(tensors: Sequence[torch.Tensor], dim: int) -> list[tuple[torch.Tensor, int, bool]]:
    """Canonical layouts [(contiguous view, dim, transposed?)] of a tensor list (type/shape errors)."""
    if isinstance(tensors, torch.Tensor):
        raise TypeError("gather_channels: pass a list of tensors, e.g. [weight, grad], not a single tensor")
    return [canonical_layout(t, dim, i) for i, t in enumerate(tensors)]


def check_layouts(layouts: list[tuple[torch.Tensor, int, bool]], idx: torch.Tensor) -> None:
    """Raise if idx is out of range for any tensor or two tensors share memory."""
    last = int(idx[-1]) if idx.numel() else -1
    spans: dict[int, tuple[int, int]] = {}
    for pos, (t, d, _) in enumerate(layouts):
        n = t.shape[d]
        if last >= n:
            raise ValueError(
                f"gather_channels: index entry {last} is out of range for tensors[{pos}] with "
                f"{n} channels along dim {d}"
            )
        if t.numel():
            start = t.data_ptr()
            span = (start, start + t.numel() * t.element_size())
            for other, (lo, hi) in spans.items():
                if span[0] < hi and lo < span[1]:
                    raise ValueError(
                        f"gather_channels: tensors[{other}] and tensors[{pos}] overlap in memory; compacting "
                        "one would corrupt the other (tied weights?) — pass each tensor once"
                    )
            spans[pos] = span


def compacted_view(t: torch.Tensor, dim: int, kept: int) -> torch.Tensor:
    """View of t's storage holding the compacted tensor (size `kept` along dim, contiguous)."""
    shape = list(t.shape)
    shape[dim] = kept
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return t.as_strided(shape, stride, t.storage_offset())


def split_layout(t: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """(A, N, B): slabs before dim, channels along dim, elements after dim."""
    a = 1
    for s in t.shape[:dim]:
        a *= s
    b = 1
    for s in t.shape[dim + 1:]:
        b *= s
    return a, t.shape[dim], b


def first_moved_item(idx: list[int] | torch.Tensor, a: int, k: int) -> int:
    """First item that is not already in place (idx[k] == k in the first slab); a*k if none moves."""
    if k == 0 or a == 0:
        return a * k
    idx_t = idx if isinstance(idx, torch.Tensor) else torch.tensor(idx)
    moved = torch.nonzero(idx_t != torch.arange(k))
    if moved.numel():
        return int(moved[0])
    return k if a > 1 else a * k


def plan_chunks(a: int, n: int, idx: torch.Tensor, bounce_items: int) -> list[tuple[int, int, bool]]:
    """Chunks (i0, i1, direct) covering the items that move; direct chunks need no bounce buffer."""
    k = idx.numel()
    if k == n or k == 0 or a == 0:
        return []
    idx_list = idx.tolist()
    total = a * k
    i = first_moved_item(idx, a, k)
    chunks = []
    while i < total:
        slab = i // k
        gap = slab * n + idx_list[i - slab * k] - i
        if gap >= bounce_items:
            end = min(total, i + gap)
            chunks.append((i, end, True))
        else:
            end = min(total, i + bounce_items)
            chunks.append((i, end, False))
        i = end
    return chunks


@torch.no_grad()
def gather_inplace_reference(t: torch.Tensor, idx: torch.Tensor, dim: int) -> None:
    """Plain-torch backend: compact contiguous t in place, one bounded chunk at a time."""
    a, n, b = split_layout(t, dim)
    k = idx.numel()
    if k in (0, n) or a == 0 or b == 0:
        return
    flat = t.view(-1)
    src = flat.view(a * n, b)
    dst = flat[: a * k * b].view(a * k, b)
    idx_dev = idx.to(t.device)
    step = max(1, min(REFERENCE_CHUNK_ITEMS, REFERENCE_CHUNK_BYTES // (b * t.element_size())))
    # Every chunk goes through a temporary, so chunks may be any size: each reads only
    # positions >= its own first item, which earlier chunks never wrote.
    for i0 in range(first_moved_item(idx, a, k), a * k, step):
        items = torch.arange(i0, min(a * k, i0 + step), device=t.device)
        slab = items // k
        dst[i0 : i0 + items.numel()] = src.index_select(0, slab * n + idx_dev[items - slab * k])


def gather_channels_with(
    tensors: Sequence[torch.Tensor],
    index: torch.Tensor | Sequence[int],
    dim: int,
    shrink: bool,
    gather_one,
    gather_all=None,
) -> list[torch.Tensor]:
    """Validate, compact the tensors, and build the result views.

    gather_one(t, idx, dim) compacts one checked tensor. gather_all(layouts, idx), when given,
    is tried first: it validates and compacts the whole list in one call and returns False
    (having changed nothing) on bad input, which is then diagnosed here with a clear error.
    (Returning the views from C++ was tried: boxing a tensor list costs more than building
    the views here.)
    """
    idx = _as_index(index)
    layouts = check_list(tensors, dim)
    if gather_all is None or not gather_all(layouts, idx):
        check_index(idx)
        check_layouts(layouts, idx)
        if gather_all is not None:
            raise RuntimeError("gather_channels: the backend rejected arguments that passed validation")
        for t, d, _ in layouts:
            if t.numel():
                gather_one(t, idx, d)
    k = idx.numel()
    results = []
    for t, d, transposed in layouts:
        view = compacted_view(t, d, k)
        if shrink:
            view = view.clone()
        results.append(view.t() if transposed else view)
    return results


def gather_channels_reference(
    tensors: Sequence[torch.Tensor],
    index: torch.Tensor | Sequence[int],
    dim: int,
    *,
    shrink: bool = False,
) -> list[torch.Tensor]:
    """Plain-torch gather_channels with the same semantics (see the module docstring)."""
    return gather_channels_with(tensors, index, dim, shrink, gather_inplace_reference)
