"""Every Triton kernel specialisation compiles ahead of time for sm_80 and sm_90 without spills.

No GPU needed: triton.compile lowers to PTX and cubin for a GPUTarget; register and spill
counts come from ptxas -v (the ptxas triton itself uses for that architecture).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compilation is meaningless under TRITON_INTERPRET=1", allow_module_level=True)

from adapt_engine.kernels import adamw_triton, gather_triton, linear_ce_triton, saliency_triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

VARIANTS = [v for mod in (saliency_triton, gather_triton, adamw_triton, linear_ce_triton) for v in mod.aot_variants()]
ARCHS = (80, 90)


def _ptxas(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except Exception as exc:  # no bundled/installed ptxas for this arch
        pytest.skip(f"ptxas unavailable: {exc}")
    return path


def _resource_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) reported by ptxas -v."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", src, "-o", src + ".o"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert regs and spills, proc.stderr
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_compiles_without_spills(variant, arch):
    name, fn, signature, constexprs, options = variant
    kernel = triton.compile(
        triton.compiler.ASTSource(fn, signature, constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(options, enable_fp_fusion=True),
    )
    assert kernel.metadata.num_warps == options["num_warps"]
    assert f".target sm_{arch}" in kernel.asm["ptx"] and kernel.asm["cubin"]
    regs, spill_stores, spill_loads = _resource_usage(kernel.asm["ptx"], arch)
    assert spill_stores == 0 and spill_loads == 0, f"{name} sm_{arch}: {regs} registers, spills"
    assert regs <= 255
