"""Triton row kernel of the fused linear + cross-entropy (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Imported lazily by kernels.dispatch: triton is an optional dependency. The matrix products of the
chunk loop (kernels/linear_ce.py) stay with torch (cuBLAS); this kernel replaces the elementwise
part, which plain torch runs as five or six passes over the chunk's logits (log-sum-exp, gather,
subtract, exp, scatter, multiply), with two.

One program per token row: the first sweep over the vocabulary keeps a running maximum and a
running sum of exponentials rescaled to it (so nothing overflows), giving the log-sum-exp; the
row's loss is that minus the target's logit. The second sweep (only when a gradient is wanted)
overwrites the logits with scale · (softmax − onehot(target)) in their own dtype. Arithmetic is
float32 whatever the logits' dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

NUM_WARPS = 8
MAX_BLOCK_V = 4096


@triton.jit
def ce_rows_kernel(
    logits_ptr,
    targets_ptr,
    scale_ptr,
    loss_ptr,
    n_cols,
    row_stride,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_V)
    # Running max m and sum s of exp(x - m): each block rescales the sum to its new maximum.
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for c0 in range(0, n_cols, BLOCK_V):
        offs = c0 + cols
        x = tl.load(base + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe_target = tl.where(valid, target, 0)
    x_target = tl.load(base + safe_target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr + row), 0.0)
        for c0 in range(0, n_cols, BLOCK_V):
            offs = c0 + cols
            mask = offs < n_cols
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(offs == safe_target, 1.0, 0.0)
            tl.store(base + offs, (p * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def block_v(n_cols: int) -> int:
    """Vocabulary tile: the whole row when it is short, else MAX_BLOCK_V columns."""
    return min(MAX_BLOCK_V, triton.next_power_of_2(max(1, n_cols)))


def ce_rows_triton(logits, targets, scale, ignore_index: int):
    """Triton row kernel with the contract of kernels.linear_ce.ce_rows_torch (logits: contiguous rows)."""
    import torch

    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    if logits.stride(1) != 1:
        raise ValueError("ce_rows_triton: logits rows must be contiguous")
    write = scale is not None
    scale_arg = scale.to(torch.float32).contiguous() if write else loss
    ce_rows_kernel[(n_rows,)](
        logits, targets.contiguous(), scale_arg, loss, n_cols, logits.stride(0), ignore_index,
        WRITE_GRAD=write, BLOCK_V=block_v(n_cols), num_warps=NUM_WARPS,
    )
    return loss


def aot_variants():
    """Specialisations launched by ce_rows_triton.

    Yields (name, kernel, signature, constexprs, options) for triton.compile.
    """
    for dtype in ("fp32", "bf16", "fp16"):
        for write in (False, True):
            for n_cols in (1000, 49152):  # a short row (one tile) and a real vocabulary (many tiles)
                signature = {
                    "logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "scale_ptr": "*fp32", "loss_ptr": "*fp32",
                    "n_cols": "i32", "row_stride": "i32", "ignore_index": "i32",
                    "WRITE_GRAD": "constexpr", "BLOCK_V": "constexpr",
                }
                constexprs = {"WRITE_GRAD": write, "BLOCK_V": block_v(n_cols)}
                name = f"ce_rows_kernel[{dtype},{'grad' if write else 'loss'},V={n_cols}]"
                yield name, ce_rows_kernel, signature, constexprs, {"num_warps": NUM_WARPS}
