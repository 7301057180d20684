"""Triton kernel for the multi-tensor AdamW step (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Imported lazily by kernels.dispatch and optim: triton is an optional dependency. The kernel walks a
table of ``(tensor, chunk)`` pairs and reads each tensor's addresses from a second table, so one launch
updates every parameter of a (param dtype, state dtype) group; see ``adamw.py`` for the math.

The jitted function is built per interpreter mode (``triton.jit`` fixes its runtime when it decorates),
so the optimizer tests can run the interpreter in-process next to compiled-mode kernels.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .adamw import BLOCK, ITERS, AdamWHyper, AdamWTensors

NUM_WARPS = 4
_TRITON_DTYPES = ("float32", "bfloat16", "float16")
SIGNATURE = {
    "addr_ptr": "*i64", "numel_ptr": "*i64", "chunk_ptr": "*i64", "lr": "fp32", "beta1": "fp32",
    "beta2": "fp32", "eps": "fp32", "decay": "fp32", "step_size": "fp32", "bc2_sqrt": "fp32",
    "P_DTYPE": "constexpr", "S_DTYPE": "constexpr", "BLOCK": "constexpr", "ITERS": "constexpr",
}


@functools.cache
def kernel_for(interpret: bool):
    """The jitted kernel for one interpreter mode."""
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4 reads TRITON_INTERPRET from the environment at decoration
        return _decorate()
    with knobs.runtime.scope():
        knobs.runtime.interpret = interpret
        return _decorate()


def _decorate():
    @triton.jit
    def adamw_multi_tensor_kernel(
        addr_ptr,  # int64 [T, 4]: addresses of param, grad, exp_avg, exp_avg_sq of tensor t
        numel_ptr,  # int64 [T]
        chunk_ptr,  # int64 [C, 2]: (tensor index, first element) handled by program c
        lr,
        beta1,
        beta2,
        eps,
        decay,  # 1 − lr·wd
        step_size,  # lr / (1 − β1^t)
        bc2_sqrt,  # √(1 − β2^t)
        P_DTYPE: tl.constexpr,
        S_DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
        ITERS: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(chunk_ptr + 2 * pid)
        start = tl.load(chunk_ptr + 2 * pid + 1)
        n = tl.load(numel_ptr + t)
        p_ptr = tl.load(addr_ptr + 4 * t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(addr_ptr + 4 * t + 1).to(tl.pointer_type(P_DTYPE))
        m_ptr = tl.load(addr_ptr + 4 * t + 2).to(tl.pointer_type(S_DTYPE))
        v_ptr = tl.load(addr_ptr + 4 * t + 3).to(tl.pointer_type(S_DTYPE))
        lanes = tl.arange(0, BLOCK)
        # Small tensors (norms, biases) need fewer than ITERS blocks: stop at the tensor's end.
        n_iters = tl.minimum(ITERS, (n - start + BLOCK - 1) // BLOCK)
        for it in tl.range(0, n_iters):
            idx = start + it * BLOCK + lanes
            mask = idx < n
            p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            p = p * decay
            m = m + (1.0 - beta1) * (g - m)
            v = v * beta2 + (1.0 - beta2) * g * g
            denom = tl.sqrt(v) / bc2_sqrt + eps
            p = p - step_size * (m / denom)
            tl.store(p_ptr + idx, p.to(P_DTYPE), mask=mask)
            tl.store(m_ptr + idx, m.to(S_DTYPE), mask=mask)
            tl.store(v_ptr + idx, v.to(S_DTYPE), mask=mask)

    return adamw_multi_tensor_kernel


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _TRITON_DTYPES:
        raise TypeError(f"the Triton AdamW kernel supports {', '.join(_TRITON_DTYPES)} tensors, got {dtype}")
    return name


@functools.lru_cache(maxsize=8)
def _chunk_table(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(tensor index, first element) of every program; cached by numels, so it changes after pruning."""
    chunk = BLOCK * ITERS
    counts = torch.tensor([max(1, -(-n // chunk)) for n in numels], dtype=torch.int64)
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    starts = (torch.arange(tensor_idx.numel(), dtype=torch.int64) - first) * chunk
    return torch.stack([tensor_idx, starts], 1).contiguous().to(device)


def adamw_step_triton(tensors: AdamWTensors, step: int, hyper: AdamWHyper) -> None:
    """Fused AdamW update in place with the Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    tensors.check(step)
    params, grads, exp_avgs, exp_avg_sqs = tensors.params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs
    if not params:
        return
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kernel = kernel_for(interpret)
    device = params[0].device
    if device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"the Triton AdamW kernel needs CUDA tensors, got {device}; use adamw_step (dispatches to the torch "
            "reference off-GPU) or set TRITON_INTERPRET=1 to run it on CPU for testing"
        )
    # One launch per (param dtype, state dtype): mixed-precision models have at most a few such groups.
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if g.dtype != p.dtype or v.dtype != m.dtype:
            raise TypeError(
                f"grad dtype {g.dtype} must equal param dtype {p.dtype} and exp_avg_sq dtype {v.dtype} must "
                f"equal exp_avg dtype {m.dtype}"
            )
        for name, x in (("param", p), ("exp_avg", m), ("exp_avg_sq", v)):
            if not x.is_contiguous():
                raise ValueError(f"the Triton AdamW kernel updates in place and needs a contiguous {name}")
            if x.device != device:
                raise ValueError(f"all tensors must be on one device, got {x.device} and {device}")
        groups.setdefault((p.dtype, m.dtype), []).append(i)
    h = hyper
    bc1, bc2_sqrt = h.bias_corrections(step)
    # Grads are read only: a non-contiguous one is copied (rare; autograd makes contiguous grads).
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    for (pdt, sdt), idx in groups.items():
        addrs = torch.tensor(
            [[params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr()]
             for i in idx],
            dtype=torch.int64,
        ).to(device, non_blocking=True)
        numels = tuple(params[i].numel() for i in idx)
        numel_t = torch.tensor(numels, dtype=torch.int64).to(device, non_blocking=True)
        chunks = _chunk_table(numels, device)
        kernel[(chunks.shape[0],)](
            addrs, numel_t, chunks,
            h.lr, h.beta1, h.beta2, h.eps, 1.0 - h.lr * h.weight_decay, h.lr / bc1, bc2_sqrt,
            P_DTYPE=getattr(tl, _dtype_name(pdt)), S_DTYPE=getattr(tl, _dtype_name(sdt)),
            BLOCK=BLOCK, ITERS=ITERS, num_warps=NUM_WARPS,
        )


def aot_variants():
    """Specialisations launched by adamw_step_triton (the common param/state dtype pairs).

    Yields (name, kernel, signature, constexprs, options) for triton.compile.
    """
    for pdt, sdt in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                     (torch.bfloat16, torch.bfloat16)):
        constexprs = {"P_DTYPE": getattr(tl, _dtype_name(pdt)), "S_DTYPE": getattr(tl, _dtype_name(sdt)),
                      "BLOCK": BLOCK, "ITERS": ITERS}
        name = f"adamw_multi_tensor_kernel[{_dtype_name(pdt)}/{_dtype_name(sdt)}]"
        yield name, kernel_for(False), SIGNATURE, constexprs, {"num_warps": NUM_WARPS}
