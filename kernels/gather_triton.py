"""Triton kernel for in-place channel gathering (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Imported lazily by kernels.dispatch: triton is an optional dependency.

The host walks the chunk plan of kernels.gather.plan_chunks: a "direct" chunk is copied by one
launch straight into place (its reads and writes are disjoint, so all programs may run at
once); any other chunk is gathered into a bounded bounce buffer and then copied into place,
the two launches ordered by the stream.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gather import plan_chunks, split_layout

# Bounce buffer budget on the GPU (or one item if a single item is larger).
BOUNCE_BYTES = 8 << 20
NUM_WARPS = 4
# Element types used to move raw bytes, by element size.
_MOVE_DTYPES = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


@triton.jit
def gather_items_kernel(
    src_ptr,
    dst_ptr,
    idx_ptr,
    i0,
    n_items,
    n_kept,
    n_channels,
    item_len,
    BLOCK_I: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_b = tl.program_id(1)
    rel = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rel < n_items
    item = rel + i0
    slab = item // n_kept
    k = item - slab * n_kept
    src_item = slab * n_channels + tl.load(idx_ptr + k, mask=mask_i, other=0)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = mask_i[:, None] & (offs_b < item_len)[None, :]
    vals = tl.load(src_ptr + src_item[:, None] * item_len + offs_b[None, :], mask=mask)
    tl.store(dst_ptr + rel[:, None] * item_len + offs_b[None, :], vals, mask=mask)


def block_shape(item_len: int) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_B): 1024-element tiles, wide along items when items are short."""
    block_b = min(1024, triton.next_power_of_2(max(1, item_len)))
    return 1024 // block_b, block_b


def gather_inplace_triton(t, idx, dim: int, bounce_bytes: int = BOUNCE_BYTES) -> None:
    """Compact contiguous t in place along dim, keeping idx (int64 CPU, validated)."""
    import torch

    a, n, b = split_layout(t, dim)
    k = idx.numel()
    es = t.element_size()
    if es not in _MOVE_DTYPES:
        raise TypeError(
            f"gather_channels: element size {es} of {t.dtype} is not supported by the Triton path"
        )
    bounce_items = max(1, bounce_bytes // max(1, b * es))
    chunks = plan_chunks(a, n, idx, bounce_items)
    if not chunks or b == 0:
        return
    flat = t.view(-1).view(getattr(torch, _MOVE_DTYPES[es]))
    idx_dev = idx.to(t.device)
    block_i, block_b = block_shape(b)
    bounce = None
    for i0, i1, direct in chunks:
        n_items = i1 - i0
        if direct:
            dst = flat[i0 * b:]
        else:
            if bounce is None:
                bounce = torch.empty(bounce_items * b, dtype=flat.dtype, device=t.device)
            dst = bounce
        grid = (triton.cdiv(n_items, block_i), triton.cdiv(b, block_b))
        gather_items_kernel[grid](
            flat, dst, idx_dev, i0, n_items, k, n, b, BLOCK_I=block_i, BLOCK_B=block_b, num_warps=NUM_WARPS
        )
        if not direct:
            flat[i0 * b: i1 * b].copy_(bounce[: n_items * b])


def aot_variants():
    """Specialisations launched by gather_inplace_triton.

    Yields (name, kernel, signature, constexprs, options) for triton.compile.
    """
    for es, dtype in _MOVE_DTYPES.items():
        for item_len in (1, 64, 4096):
            block_i, block_b = block_shape(item_len)
            signature = {
                "src_ptr": f"*{dtype.replace('int', 'i')}", "dst_ptr": f"*{dtype.replace('int', 'i')}",
                "idx_ptr": "*i64", "i0": "i64", "n_items": "i32", "n_kept": "i32", "n_channels": "i32",
                "item_len": "constexpr" if item_len == 1 else "i32",
                "BLOCK_I": "constexpr", "BLOCK_B": "constexpr",
            }
            constexprs = {"BLOCK_I": block_i, "BLOCK_B": block_b}
            if item_len == 1:
                constexprs["item_len"] = 1
            name = f"gather_items_kernel[{es * 8}-bit,B={item_len}]"
            yield name, gather_items_kernel, signature, constexprs, {"num_warps": NUM_WARPS}
