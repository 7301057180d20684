"""The Triton row kernel of the fused linear + cross-entropy under the interpreter, in a child process.

TRITON_INTERPRET must be set before triton is imported; a child pytest keeps that switch away
from the rest of the suite. (The ahead-of-time sm_80/sm_90 compile is in test_kernel_triton_compile.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


def test_linear_ce_triton_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           str(HERE / "interpret_linear_ce_cases.py")]
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
