"""Triton kernel for group saliency (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Imported lazily by kernels.dispatch: triton is an optional dependency.

One program reads a [BLOCK_K, BLOCK_R] tile stream (BLOCK_K scored indices × a slice of the
reduced axis) of weight/grad (and the Fisher sum), accumulates in fp32 and writes one partial
per scored index. The reduced axis is split over a second grid dimension when there are too
few scored indices to fill the GPU; the tiny [splits, n_keep] partial buffer and the
group folding are summed afterwards (deterministic: no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .saliency import METRIC_IDS, SaliencyArgs

TAYLOR: tl.constexpr = tl.constexpr(METRIC_IDS["taylor"])
VECTORIZE: tl.constexpr = tl.constexpr(METRIC_IDS["vectorize"])
MAGNITUDE: tl.constexpr = tl.constexpr(METRIC_IDS["magnitude"])
PARAM_MIX: tl.constexpr = tl.constexpr(METRIC_IDS["param_mix"])

NUM_WARPS = 8
# Programs to aim for: a few waves on the largest GPUs (132 SMs on H100).
TARGET_PROGRAMS = 1024
MAX_BLOCK_K = 1024


@triton.jit
def saliency_partial_kernel(
    w_ptr,
    g_ptr,
    f_ptr,
    part_ptr,
    n_keep,
    n_red,
    red_per_program,
    w_sk,
    w_sr,
    g_sk,
    g_sr,
    f_sk,
    f_sr,
    half_scale,
    METRIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < n_keep
    r_begin = pid_s.to(tl.int64) * red_per_program
    r_end = tl.minimum(r_begin + red_per_program, n_red)
    acc = tl.zeros([BLOCK_K, BLOCK_R], dtype=tl.float32)
    for r0 in range(0, red_per_program, BLOCK_R):
        offs_r = r_begin + r0 + tl.arange(0, BLOCK_R)
        mask = mask_k[:, None] & (offs_r < r_end)[None, :]
        w_ptrs = w_ptr + offs_k[:, None] * w_sk + offs_r[None, :] * w_sr
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        if METRIC == MAGNITUDE:
            v = tl.abs(w)
        else:
            g = tl.load(g_ptr + offs_k[:, None] * g_sk + offs_r[None, :] * g_sr, mask=mask, other=0.0).to(
                tl.float32
            )
            if METRIC == TAYLOR:
                v = tl.abs(w * g)
            elif METRIC == VECTORIZE:
                v = w * g
            else:
                f_ptrs = f_ptr + offs_k[:, None] * f_sk + offs_r[None, :] * f_sr
                f = tl.load(f_ptrs, mask=mask, other=0.0) + g * g
                tl.store(f_ptrs, f, mask=mask)
                v = tl.abs(w * g - half_scale * w * w * f)
        acc += v
    tl.store(part_ptr + pid_s * n_keep + offs_k, tl.sum(acc, axis=1), mask=mask_k)


def tile_shape(keep_contiguous: bool, metric: str, n_red: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_R): tiles whose long side follows the contiguous axis.

    4096 elements (16 per thread per tensor); param_mix streams three tensors and stores one,
    so it gets half the tile to keep registers (and occupancy) in check. Short reductions
    (biases, skinny matrices) get a tile that is wide along the scored axis instead.
    """
    elems = 2048 if metric == "param_mix" else 4096
    block_k, block_r = (128, elems // 128) if keep_contiguous else (elems // 512, 512)
    if n_red < block_r:
        block_r = triton.next_power_of_2(max(1, n_red))
        block_k = min(MAX_BLOCK_K, elems // block_r)
    return block_k, block_r


def accumulate_saliency_triton(args: SaliencyArgs, out) -> None:
    """Triton backend: add raw group scores of args into out (float32, contiguous)."""
    import torch

    w, g, f = args.weight, args.grad, args.fisher
    d = args.dim
    n_keep, n_red = w.shape[d], w.shape[1 - d]
    if n_keep == 0 or n_red == 0:
        return

    def strides(t):
        if t is None:
            return 0, 0
        return (t.stride(d) if n_keep > 1 else 1), (t.stride(1 - d) if n_red > 1 else 1)

    (w_sk, w_sr), (g_sk, g_sr), (f_sk, f_sr) = strides(w), strides(g), strides(f)
    block_k, block_r = tile_shape(w_sk == 1 and w_sr != 1, args.metric, n_red)
    keep_blocks = triton.cdiv(n_keep, block_k)
    max_splits = triton.cdiv(n_red, block_r)
    splits = max(1, min(max_splits, TARGET_PROGRAMS // keep_blocks))
    red_per_program = triton.cdiv(triton.cdiv(n_red, splits), block_r) * block_r
    splits = triton.cdiv(n_red, red_per_program)
    part = torch.empty((splits, n_keep), dtype=torch.float32, device=w.device)
    saliency_partial_kernel[(keep_blocks, splits)](
        w,
        g if g is not None else w,
        f if f is not None else part,
        part,
        n_keep,
        n_red,
        red_per_program,
        w_sk,
        w_sr,
        g_sk,
        g_sr,
        f_sk,
        f_sr,
        0.5 * args.fisher_scale,
        METRIC=METRIC_IDS[args.metric],
        BLOCK_K=block_k,
        BLOCK_R=block_r,
        num_warps=NUM_WARPS,
        enable_fp_fusion=True,
    )
    out += part.sum(0).view(-1, args.group_size).sum(1)


def aot_variants():
    """Specialisations launched by accumulate_saliency_triton.

    Yields (name, kernel, signature, constexprs, options) for triton.compile.
    """
    for metric, metric_id in METRIC_IDS.items():
        # fp16 lowers like bf16 (a 16-bit load and a convert); compile it for one metric.
        for dtype in ("fp32", "bf16", "fp16") if metric == "taylor" else ("fp32", "bf16"):
            # Row scores (reduced axis contiguous), column scores (scored axis contiguous), and a
            # bias (one element per scored index: both strides 1).
            for layout, n_red in (("row", 4096), ("col", 4096), ("bias", 1)):
                keep_contiguous = layout != "row"
                block_k, block_r = tile_shape(keep_contiguous, metric, n_red)
                signature = {
                    "w_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "f_ptr": "*fp32", "part_ptr": "*fp32",
                    "n_keep": "i32", "n_red": "i32", "red_per_program": "i32",
                    "w_sk": "i32", "w_sr": "i32", "g_sk": "i32", "g_sr": "i32", "f_sk": "i32", "f_sr": "i32",
                    "half_scale": "fp32",
                    "METRIC": "constexpr", "BLOCK_K": "constexpr", "BLOCK_R": "constexpr",
                }
                constexprs = {"METRIC": metric_id, "BLOCK_K": block_k, "BLOCK_R": block_r}
                # Parameters are contiguous, so the JIT sees stride 1 on the fast axis of all
                # three tensors and specialises it to a constant; compile the same thing.
                units = {"row": ("sr",), "col": ("sk",), "bias": ("sk", "sr")}[layout]
                for t in ("w", "g", "f"):
                    for axis in units:
                        signature[f"{t}_{axis}"] = "constexpr"
                        constexprs[f"{t}_{axis}"] = 1
                if layout == "bias":
                    signature["n_red"] = signature["red_per_program"] = "constexpr"
                    constexprs["n_red"] = constexprs["red_per_program"] = 1
                name = f"saliency_partial_kernel[{metric},{dtype},{layout}]"
                yield name, saliency_partial_kernel, signature, constexprs, {"num_warps": NUM_WARPS}
