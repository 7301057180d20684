"""Fused AdamW: torch reference vs torch.optim.AdamW, Triton kernel (interpreter) vs reference. Its
ahead-of-time compile for sm_80/sm_90 is in test_kernel_triton_compile.py (adamw_triton.aot_variants)."""

from __future__ import annotations

import pytest
import torch
from adapt_engine.kernels import adamw_step
from adapt_engine.kernels.adamw import BLOCK, ITERS, AdamWHyper, AdamWTensors, adamw_step_reference
from adapt_engine.kernels.dispatch import triton_available

if triton_available():
    from adapt_engine.kernels.adamw_triton import adamw_step_triton

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
        adamw_step_reference(AdamWTensors([q], [g], [m], [v]), step, AdamWHyper(**HP))
    torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, opt.state[p]["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step", [1, 7])
def test_triton_matches_reference(interpret, dtype, step):
    p, g, m, v = _tensors(SHAPES, dtype)
    p2, m2, v2 = _clone(p), _clone(m), _clone(v)
    adamw_step_triton(AdamWTensors(p, g, m, v), step, AdamWHyper(**HP))
    adamw_step_reference(AdamWTensors(p2, g, m2, v2), step, AdamWHyper(**HP))
    for a, b in zip(p + m + v, p2 + m2 + v2):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@needs_triton
def test_triton_low_precision_params_with_fp32_state(interpret):
    """bf16 weights with fp32 moments: one launch per (param dtype, state dtype) pair, mixed in one call."""
    pb, gb, mb, vb = _tensors([(33, 17), (5,)], torch.bfloat16, state_dtype=torch.float32)
    pf, gf, mf, vf = _tensors([(9,)], torch.float32, seed=1)
    p, g, m, v = pb + pf, gb + gf, mb + mf, vb + vf
    p2, m2, v2 = _clone(p), _clone(m), _clone(v)
    adamw_step_triton(AdamWTensors(p, g, m, v), 3, AdamWHyper(**HP))
    adamw_step_reference(AdamWTensors(p2, g, m2, v2), 3, AdamWHyper(**HP))
    for a, b in zip(m + v, m2 + v2):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(p, p2):
        torch.testing.assert_close(a.float(), b.float(), **TOL[a.dtype])


@needs_triton
def test_triton_after_tensors_shrink(interpret):
    """The chunk table follows the current numels: shrink a tensor (as pruning does) and step again."""
    p, g, m, v = _tensors([(40, 24)], torch.float32)
    adamw_step_triton(AdamWTensors(p, g, m, v), 1, AdamWHyper(**HP))
    keep = torch.tensor([0, 3, 5, 17, 39])
    p, g, m, v = ([x[keep].contiguous()] for x in (p[0], g[0], m[0], v[0]))
    p2, m2, v2 = _clone(p), _clone(m), _clone(v)
    adamw_step_triton(AdamWTensors(p, g, m, v), 2, AdamWHyper(**HP))
    adamw_step_reference(AdamWTensors(p2, g, m2, v2), 2, AdamWHyper(**HP))
    torch.testing.assert_close(p[0], p2[0], **TOL[torch.float32])


@needs_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p, g, m, v = _tensors([(4,)], torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        adamw_step_triton(AdamWTensors(p, g, m, v), 1, AdamWHyper(**HP))


def test_dispatch_uses_reference_off_gpu():
    p, g, m, v = _tensors([(6, 5)], torch.float32)
    p2, m2, v2 = _clone(p), _clone(m), _clone(v)
    adamw_step(p, g, m, v, 2, **HP)
    adamw_step_reference(AdamWTensors(p2, g, m2, v2), 2, AdamWHyper(**HP))
    assert torch.equal(p[0], p2[0])


def test_shape_mismatch_names_the_fix():
    p, g, m, v = _tensors([(6, 5)], torch.float32)
    with pytest.raises(ValueError, match="slice the optimizer state"):
        adamw_step_reference(AdamWTensors(p, g, [m[0][:3]], v), 1, AdamWHyper(**HP))
    with pytest.raises(ValueError, match="step counter"):
        adamw_step_reference(AdamWTensors(p, g, m, v), 0, AdamWHyper(**HP))
