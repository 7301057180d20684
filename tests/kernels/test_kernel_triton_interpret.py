"""Runs the Triton kernels under the interpreter on CPU tensors, in a child process.

TRITON_INTERPRET must be set before triton is imported; a child pytest keeps that switch away
from the rest of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


# saliency, gather and AdamW kernels; the fused linear + cross-entropy kernel
@pytest.mark.parametrize("cases", ["interpret_triton_cases.py", "interpret_linear_ce_cases.py"])
def test_triton_kernels_under_interpreter(cases):
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(HERE / cases)]
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
