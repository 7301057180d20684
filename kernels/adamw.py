"""Fused AdamW step over many tensors: one Triton launch for CUDA, plain torch reference beside it.

Math (decoupled weight decay, as ``torch.optim.AdamW``), per element, computed in float32::

    p ← p·(1 − lr·wd)
    m ← m + (1 − β1)·(g − m)
    v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

Why multi-tensor: a decoder LLM has hundreds of parameter tensors (SmolLM2: 272), many tiny (norms).
One launch per tensor costs tens of µs of Python/launch overhead each, more than the update itself, so
the kernel walks a table of ``(tensor, chunk)`` pairs and reads each tensor's addresses from a second
table. Nothing is cached per parameter *shape*: the chunk table is rebuilt whenever numels change, so
a parameter shrunk in place by pruning (with its moments sliced alike) just works on the next step.

``triton`` is an optional extra: it is imported on first use, never at module import.
"""

from __future__ import annotations

import functools
import math
import os

import torch

# Elements per program: BLOCK lanes × ITERS iterations (a 16 Ki-element chunk keeps launches few
# for big matrices while a 576-element norm still gets exactly one program).
BLOCK = 1024
ITERS = 16
NUM_WARPS = 4

_TRITON_DTYPES = ("float32", "bfloat16", "float16")


def adamw_step_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Plain-torch AdamW update in place (float32 math, results cast back to each tensor's dtype)."""
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, step)
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p32, g32, m32, v32 = p.float(), g.float(), m.float(), v.float()
        p32 = p32 * (1.0 - lr * weight_decay)
        m32 = m32 + (1.0 - beta1) * (g32 - m32)
        v32 = v32 * beta2 + (1.0 - beta2) * g32 * g32
        denom = v32.sqrt() / bc2_sqrt + eps
        p32 = p32 - (lr / bc1) * (m32 / denom)
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)


def _check_lists(params, grads, exp_avgs, exp_avg_sqs, step) -> None:
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError(
            f"adamw step needs one grad and two moments per param, got {len(params)} params, "
            f"{len(grads)} grads, {len(exp_avgs)} exp_avgs, {len(exp_avg_sqs)} exp_avg_sqs"
        )
    if step < 1:
        raise ValueError(f"adamw step counter must be >= 1 (it is incremented before the update), got {step}")
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if not (p.shape == g.shape == m.shape == v.shape):
            raise ValueError(
                f"param {tuple(p.shape)}, grad {tuple(g.shape)}, exp_avg {tuple(m.shape)} and exp_avg_sq "
                f"{tuple(v.shape)} must have the same shape; after pruning, slice the optimizer state "
                "with the same indices as the weight (surgery.apply_plan(..., optimizer=opt) does this)"
            )


# ---------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------


def triton_available() -> bool:
    """Whether the optional ``triton`` package can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _build(interpret: bool):
    """The jitted kernel (built per interpreter mode: ``triton.jit`` picks its runtime at decoration)."""
    import triton
    import triton.language as tl

    try:
        from triton import knobs
    except ImportError:  # triton < 3.4 reads TRITON_INTERPRET from the environment at decoration
        return _decorate(triton, tl), tl
    with knobs.runtime.scope():
        knobs.runtime.interpret = interpret
        return _decorate(triton, tl), tl


def _decorate(triton, tl):
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


def triton_kernel():
    """The compiled-mode ``JITFunction`` (for ahead-of-time compilation checks without a GPU)."""
    return _build(False)[0]


def triton_constexprs(param_dtype: torch.dtype, state_dtype: torch.dtype) -> dict:
    """Constexpr arguments of the kernel for a (param, state) dtype pair."""
    tl = _build(False)[1]
    return {
        "P_DTYPE": getattr(tl, _dtype_name(param_dtype)),
        "S_DTYPE": getattr(tl, _dtype_name(state_dtype)),
        "BLOCK": BLOCK,
        "ITERS": ITERS,
    }


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


def adamw_step_triton(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Fused AdamW update in place with the Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, step)
    if not params:
        return
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kernel, tl = _build(interpret)
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
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
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
            lr, beta1, beta2, eps, 1.0 - lr * weight_decay, lr / bc1, bc2_sqrt,
            P_DTYPE=getattr(tl, _dtype_name(pdt)), S_DTYPE=getattr(tl, _dtype_name(sdt)),
            BLOCK=BLOCK, ITERS=ITERS, num_warps=NUM_WARPS,
        )


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Fused AdamW update in place: the Triton kernel for CUDA tensors when triton is installed, else torch."""
    on_cuda = bool(params) and params[0].device.type == "cuda"
    fn = adamw_step_triton if on_cuda and triton_available() else adamw_step_reference
    fn(params, grads, exp_avgs, exp_avg_sqs, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
       weight_decay=weight_decay)
