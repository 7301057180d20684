"""host_memory: freed heap pages go back to the system on request (glibc), and both calls are safe anywhere."""

from __future__ import annotations

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
