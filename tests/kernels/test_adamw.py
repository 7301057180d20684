"""Fused AdamW: torch reference vs torch.optim.AdamW, Triton kernel (interpreter) vs reference, and an
ahead-of-time compile for sm_80/sm_90 checked for register spills (no GPU needed)."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from adapt_engine.kernels.adamw import (
    BLOCK,
    ITERS,
    adamw_step,
    adamw_step_reference,
    adamw_step_triton,
    triton_available,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")

HP = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
# Odd sizes: below one block, not a multiple of BLOCK, and one element past a whole program chunk.
SHAPES = [(1,), (7,), (33, 17), (1025,), (BLOCK * ITERS + 3,)]
# bf16/fp16 tolerance: one ulp of the result (the interpreter truncates on downcast, GPUs round).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=1e-3)}


@pytest.fixture(scope="module")
def interpret():
    """Run Triton kernels on CPU tensors for this module only (the kernel is built per mode, so the rest
    of the suite keeps compiled-mode kernels)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _tensors(shapes, dtype, state_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    state_dtype = state_dtype or dtype

    def r(s, scale=1.0, dt=dtype):
        return (torch.randn(s, generator=g) * scale).to(dt)

    params = [r(s) for s in shapes]
    grads = [r(s) for s in shapes]
    m = [r(s, 0.1, state_dtype) for s in shapes]
    v = [(torch.rand(s, generator=g) * 0.01).to(state_dtype) for s in shapes]
    return params, grads, m, v


def _clone(xs):
    return [x.clone() for x in xs]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_torch_adamw_over_steps(shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    q = p.detach().clone()
    m, v = torch.zeros_like(q), torch.zeros_like(q)
    opt = torch.optim.AdamW([p], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False)
    for step in range(1, 5):
        g = torch.randn(shape)
        p.grad = g.clone()
        opt.step()
        adamw_step_reference([q], [g], [m], [v], step, **HP)
    torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, opt.state[p]["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step", [1, 7])
def test_triton_matches_reference(interpret, dtype, step):
    p, g, m, v = _tensors(SHAPES, dtype)
    p2, m2, v2 = _clone(p), _clone(m), _clone(v)
    adamw_step_triton(p, g, m, v, step, **HP)
    adamw_step_reference(p2, g, m2, v2, step, **HP)
    for a, b in zip(p + m + v, p2 + m2 + v2):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@needs_triton
def test_triton_low_precision_params_with_fp32_state(interpret):
    """bf16 weights with fp32 moments: one launch per (param dtype, state dtype) pair, mixed in one call."""
    pb, gb, mb, vb = _tensors([(33, 17), (5,)], torch.bfloat16, state_dtype=torch.float32)
    pf, gf, mf, vf = _tensors([(9,)], torch.float32, seed=1)
    p, g, m, v = pb + pf, gb + gf, mb + mf, vb + vf
    p2, m2, v2 = _clone(p), _clone(m), _clone(v)
    adamw_step_triton(p, g, m, v, 3, **HP)
    adamw_step_reference(p2, g, m2, v2, 3, **HP)
    for a, b in zip(m + v, m2 + v2):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(p, p2):
        torch.testing.assert_close(a.float(), b.float(), **TOL[a.dtype])


@needs_triton
def test_triton_after_tensors_shrink(interpret):
    """The chunk table follows the current numels: shrink a tensor (as pruning does) and step again."""
    p, g, m, v = _tensors([(40, 24)], torch.float32)
    adamw_step_triton(p, g, m, v, 1, **HP)
    keep = torch.tensor([0, 3, 5, 17, 39])
    p, g, m, v = ([x[keep].contiguous()] for x in (p[0], g[0], m[0], v[0]))
    p2, m2, v2 = _clone(p), _clone(m), _clone(v)
    adamw_step_triton(p, g, m, v, 2, **HP)
    adamw_step_reference(p2, g, m2, v2, 2, **HP)
    torch.testing.assert_close(p[0], p2[0], **TOL[torch.float32])


@needs_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p, g, m, v = _tensors([(4,)], torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        adamw_step_triton(p, g, m, v, 1, **HP)


def test_dispatch_uses_reference_off_gpu():
    p, g, m, v = _tensors([(6, 5)], torch.float32)
    p2, m2, v2 = _clone(p), _clone(m), _clone(v)
    adamw_step(p, g, m, v, 2, **HP)
    adamw_step_reference(p2, g, m2, v2, 2, **HP)
    assert torch.equal(p[0], p2[0])


def test_shape_mismatch_names_the_fix():
    p, g, m, v = _tensors([(6, 5)], torch.float32)
    with pytest.raises(ValueError, match="slice the optimizer state"):
        adamw_step_reference(p, g, [m[0][:3]], v, 1, **HP)
    with pytest.raises(ValueError, match="step counter"):
        adamw_step_reference(p, g, m, v, 0, **HP)


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs (no GPU needed): PTX → cubin with ptxas, no register spills.
# ---------------------------------------------------------------------------------------------------------

SIGNATURE = {
    "addr_ptr": "*i64", "numel_ptr": "*i64", "chunk_ptr": "*i64", "lr": "fp32", "beta1": "fp32",
    "beta2": "fp32", "eps": "fp32", "decay": "fp32", "step_size": "fp32", "bc2_sqrt": "fp32",
    "P_DTYPE": "constexpr", "S_DTYPE": "constexpr", "BLOCK": "constexpr", "ITERS": "constexpr",
}


def _ptxas_usage(ptx: str, arch: int, tmp_path) -> tuple[int, int]:
    """(registers, spill bytes) reported by Triton's bundled ptxas for one kernel."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception as exc:  # noqa: BLE001 - no bundled or installed ptxas for this arch
        pytest.skip(f"ptxas unavailable: {exc}")
    src = tmp_path / f"adamw_sm{arch}.ptx"
    src.write_text(ptx)
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)  # e.g. sm_90a for Hopper
    cmd = [ptxas, "-v", f"--gpu-name={target}", str(src), "-o", str(src) + ".cubin"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


@needs_triton
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("pdt,sdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                     (torch.bfloat16, torch.bfloat16)])
def test_aot_compiles_without_spills(arch, pdt, sdt, tmp_path):
    import triton
    from adapt_engine.kernels.adamw import NUM_WARPS, triton_constexprs, triton_kernel
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(triton_kernel(), SIGNATURE, triton_constexprs(pdt, sdt))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": NUM_WARPS, "enable_fp_fusion": True})
    assert compiled.asm["cubin"], "no cubin produced"
    regs, spills = _ptxas_usage(compiled.asm["ptx"], arch, tmp_path)
    assert spills == 0, f"sm_{arch}: {spills} bytes of register spills"
    assert regs <= 255
