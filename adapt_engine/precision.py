"""How float32 matrix products are computed during calibration: IEEE, or the CPU's bf16-based mode when a probe
shows it keeps float32 accuracy.

oneDNN (PyTorch's CPU matmul backend) can compute float32 products with bf16 arithmetic
(``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``). On CPUs with AVX512-BF16 it splits each operand
into bf16 parts and keeps float32-class accuracy (measured: a 2048 × 576 × 1536 product differs from float64
by 1.2e-4 against IEEE float32's 5.3e-5, while a plain bf16 product is off by 0.45) at 2-3× the speed. What a
CPU does in this mode is the library's choice, so ``auto`` turns it on only after a probe product proves the
accuracy on the machine at hand: an Intel Xeon with AMX (oneDNN 3.12, torch 2.13) computes it in plain bf16
(probe error 2.6e-3), so there ``auto`` means IEEE.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from .args import FP32_MATMULS
from .errors import UsageError

# Largest |error| of the probe product relative to its largest |entry|. IEEE float32 gives ~5e-7 on it and a
# plain bf16 product ~4e-3; the split-bf16 mode gives ~1e-6. 1e-5 accepts float32-class results only.
PROBE_TOLERANCE = 1e-5


def _mkldnn_matmul():
    """The backend flag holder, or None on a torch without the fp32-precision switch."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return matmul if matmul is not None and hasattr(matmul, "fp32_precision") else None


@contextlib.contextmanager
def fp32_matmul(mode: str) -> Iterator[None]:
    """Compute CPU float32 matmuls in ``mode`` (``ieee`` or ``bf16``) inside the block; restore the old mode after."""
    matmul = _mkldnn_matmul()
    if matmul is None or mode == "ieee" and matmul.fp32_precision in ("ieee", "none"):
        yield
        return
    old = matmul.fp32_precision
    matmul.fp32_precision = mode
    try:
        yield
    finally:
        matmul.fp32_precision = old


def probe_error() -> float:
    """The bf16 mode's error on a fixed random 256 × 512 × 256 product, relative to its largest entry."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=g), torch.randn(512, 256, generator=g)
    exact = a.double() @ b.double()
    with fp32_matmul("bf16"):
        got = a @ b
    return float((got.double() - exact).abs().max() / exact.abs().max())


@functools.cache
def bf16_mode_is_accurate() -> bool:
    """Whether this CPU's bf16 mode for float32 matmuls keeps float32 accuracy (probe error ≤ PROBE_TOLERANCE)."""
    return _mkldnn_matmul() is not None and probe_error() <= PROBE_TOLERANCE


def resolve_fp32_matmul(name: str, device: torch.device | str) -> str:
    """The matmul mode a ``--fp32-matmul`` choice means on ``device``: ``ieee`` or ``bf16``."""
    if name not in FP32_MATMULS:
        raise UsageError(f"--fp32-matmul must be one of {', '.join(FP32_MATMULS)}, got '{name}'")
    if torch.device(device).type != "cpu":
        if name == "bf16":
            raise UsageError("--fp32-matmul bf16 is a CPU (oneDNN) mode; on a GPU use --fp32-matmul ieee or auto, "
                             "or --calib-dtype bfloat16 for bf16 autocast")
        return "ieee"
    if name == "bf16" and _mkldnn_matmul() is None:
        raise UsageError(f"--fp32-matmul bf16 needs torch.backends.mkldnn.matmul.fp32_precision, which torch "
                         f"{torch.__version__} lacks; use --fp32-matmul ieee or upgrade torch")
    if name == "auto":
        return "bf16" if bf16_mode_is_accurate() else "ieee"
    return name
