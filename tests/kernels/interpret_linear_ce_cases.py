"""The Triton row kernel of the fused linear + cross-entropy under TRITON_INTERPRET=1 on CPU tensors.

Run by test_kernel_linear_ce_triton.py in a child pytest process (the interpreter must be switched
on before triton is imported); not collected by the main run (the name does not match test_*.py).
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
triton = pytest.importorskip("triton")

import torch  # noqa: E402
from adapt_engine.kernels.linear_ce import ce_rows_torch, run_linear_cross_entropy  # noqa: E402
from adapt_engine.kernels.linear_ce_triton import MAX_BLOCK_V, ce_rows_triton  # noqa: E402
from linear_ce_cases import assert_matches_truth, check_fp32_case, make_inputs, run, truth  # noqa: E402

# Small shapes (the interpreter runs each program in numpy); vocabularies below one tile, one
# element past a tile, and several tiles with a ragged end.
CASES = [((1,), 7, 5, None), ((3, 5), 1000, 16, 7), ((2, 3), MAX_BLOCK_V + 1, 8, 4), ((5,), 9001, 8, 2)]


def _triton_loss(hidden, weight, targets, *, reduction="mean", ignore_index=-100, chunk=None):
    return run_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, chunk, ce_rows_triton)


@pytest.mark.parametrize("ignore", ("none", "some", "all"))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_loss_with_triton_rows(case, reduction, ignore):
    check_fp32_case(_triton_loss, case, reduction, ignore)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_16_bit_logits(dtype):
    h, w, t = make_inputs((2, 9), 1500, 16, dtype, "some", seed=1)
    got = run(_triton_loss, h, w, t, "mean", chunk=5)
    assert_matches_truth(got, truth(h, w, t, "mean"), dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_rows_match_the_torch_rows(dtype):
    """Same contract as ce_rows_torch: per-row loss and the scaled logit gradient written in place."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, 5000, generator=gen) * 4).to(dtype)
    targets = torch.tensor([0, 4999, -100, 17, 2500, 3])
    scale = torch.linspace(0.1, 1.0, 6)
    a, b = logits.clone(), logits.clone()
    la = ce_rows_triton(a, targets, scale, -100)
    lb = ce_rows_torch(b, targets, scale, -100)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # one 16-bit rounding of values below 1
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    assert not a[2].any()  # an ignored row gets no gradient
    c = logits.clone()
    torch.testing.assert_close(ce_rows_triton(c, targets, None, -100), lb, rtol=1e-5, atol=1e-5)
    assert torch.equal(c, logits)  # loss only: the logits are left alone
