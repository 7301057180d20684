"""Handing freed host memory back to the system, so a process's RSS follows what it still holds (glibc only).

glibc keeps freed blocks in its heaps for reuse and raises its mmap threshold by itself (up to 32 MB) after large
blocks are freed. A prune frees and reallocates every weight at a new size each sub-step, and a streamed run
cycles whole layers through memory; both then hold memory they no longer use. On other C libraries these
functions do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os

# mallopt's M_MMAP_THRESHOLD: blocks at least this large get their own mapping, unmapped when freed.
_M_MMAP_THRESHOLD = -3
_OWN_MAPPING_BYTES = 1 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def trim_heap() -> None:
    """Give the free pages of every glibc heap back to the system (``malloc_trim(0)``, a few ms).

    Measured on the 16-sub-step SmolLM2 prune (issue 13): without it the RSS before each calibration pass crept
    from 2.2 to 2.7 GB while the model shrank, and the peak moved from the first sub-step to the twelfth."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_blocks_alone() -> None:
    """Have glibc map every block of 1 MB or more on its own, so a freed layer's memory goes back to the system.

    Process-wide, for streamed runs: keeping freed layers in the heaps (one per thread, and the prefetcher is a
    thread) left a streamed 1B Llama at 1.27 GB peak RSS, 0.98 GB with this. Not used in memory: a mapping per
    block costs page faults on every allocation (a one-sub-step SmolLM2 prune: 13.6 s of system time, 3.5 s without)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _OWN_MAPPING_BYTES)


# oneDNN, which runs bf16 matmuls on CPU, keeps a compiled kernel per matmul shape in two caches of 1,024 entries
# (its own primitive cache and PyTorch's ideep cache). A prune gives every layer new shapes at every sub-step, so
# under bf16 calibration the memory held after each sub-step grew by ~33 MB (987 -> 1,164 MB after 4 of 16
# SmolLM2 sub-steps, heap trimmed) and the anchor prune's peak by ~530 MB. With 64 entries each it stops after the
# second sub-step (1,048, 1,081, 1,086, 1,087 MB) and the sub-steps ran as fast (issue 13, README).
KERNEL_CACHE_ENTRIES = 64
_KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Cap oneDNN's per-shape kernel caches at ``entries`` each, unless the environment sets them already.

    Takes effect only before the process runs its first oneDNN matmul (the caches read these variables once)."""
    for name in _KERNEL_CACHES:
        os.environ.setdefault(name, str(entries))
