"""host_memory: freed heap pages go back to the system on request (glibc), and both calls are safe anywhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from adapt_engine import host_memory

# In a fresh process (the heap is not shared with the test runner): 64 KB blocks live in glibc's heap (under
# its 128 KB mmap threshold). Freeing all but the last leaves ~100 MB of free pages below a live block, which
# the heap cannot shrink past on its own; trim_heap must hand them back.
CHILD = r"""
import re, sys
from adapt_engine.host_memory import trim_heap
def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
blocks = [bytearray(64 * 1024) for _ in range(1600)]
for b in blocks:
    b[::4096] = b"x" * len(b[::4096])  # touch every page
keep = blocks[-1]
del blocks
before = rss_mb()
trim_heap()
print(before, rss_mb())
"""


def _glibc() -> bool:
    return host_memory._glibc() is not None


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="malloc_trim is glibc's")
def test_trim_heap_returns_free_pages_below_a_live_block():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    before, after = (float(x) for x in out.stdout.split())
    assert before - after > 80, f"RSS {before:.0f} MB -> {after:.0f} MB: the ~100 MB of freed blocks stayed resident"


def test_without_glibc_both_calls_do_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "_glibc", lambda: calls.append(1))  # what a non-glibc system returns: None
    host_memory.trim_heap()
    host_memory.map_large_blocks_alone()
    assert len(calls) == 2


# bf16 matmuls of 200 distinct shapes in a fresh process (the caches read their size once), heap trimmed: how much
# resident memory the shapes' cached kernels kept, with or without bound_kernel_caches() first.
SHAPES_CHILD = r"""
import os, re, sys, torch
from adapt_engine.host_memory import bound_kernel_caches, trim_heap
for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.pop(name, None)
if sys.argv[1] == "bound":
    bound_kernel_caches()
torch.set_num_threads(1)
def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
a = torch.randn(64, 96, dtype=torch.bfloat16)
(a @ torch.randn(96, 8, dtype=torch.bfloat16))
trim_heap()
before = rss_mb()
for n in range(200):
    a @ torch.randn(96, 100 + n, dtype=torch.bfloat16)
trim_heap()
print(rss_mb() - before)
"""


def test_bounded_kernel_caches_stop_growing_with_new_shapes():
    """With bound_kernel_caches(), new bf16 matmul shapes stop adding resident memory once the caches are full; the
    check runs only where the unbounded caches do grow (oneDNN's bf16 kernels: AMX or AVX512-BF16 CPUs)."""
    def grown(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", SHAPES_CHILD, mode], capture_output=True, text=True,
                             timeout=300, check=True)
        return float(out.stdout.split()[-1])

    unbounded = grown("default")
    if unbounded < 40:
        pytest.skip(f"bf16 matmuls of new shapes kept only {unbounded:.0f} MB here: no per-shape kernel cache")
    bounded = grown("bound")
    assert bounded < 0.5 * unbounded, f"{bounded:.0f} MB kept with the caches bounded, {unbounded:.0f} MB without"


def test_bound_kernel_caches_keeps_what_the_environment_says(monkeypatch):
    environ = {"LRU_CACHE_CAPACITY": "7"}  # a user's own setting
    monkeypatch.setattr(os, "environ", environ)
    host_memory.bound_kernel_caches()
    entries = str(host_memory.KERNEL_CACHE_ENTRIES)
    assert environ == {"LRU_CACHE_CAPACITY": "7", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": entries}
