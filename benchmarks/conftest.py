"""Benchmark harness: collects bench_*.py, measures this machine's read bandwidth once per session,
records per-benchmark GB/s, % of bandwidth and ratios, and prints a summary table at the end.

    pytest benchmarks/ --benchmark-only --benchmark-json=out/bench.json

The summary is also written to .benchmarks/summary.json (atomically). ADAPT_BENCH_THREADS=N
sets torch's intra-op threads for the whole session (kernels and references alike): on a
machine whose other cores are busy, 1 thread gives stable numbers where 2 would wait on a
descheduled worker.
"""

from __future__ import annotations

import fnmatch
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

_ROWS: list[dict] = []
_BANDWIDTH: dict[str, float] = {}
SUMMARY_PATH = Path(".benchmarks") / "summary.json"


def pytest_configure(config):
    threads = os.environ.get("ADAPT_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py like test modules (pytest's default pattern is test_*.py)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path) or any(
        fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")
    ):
        return None  # pytest collects it already (named on the command line, or via python_files)
    return pytest.Module.from_parent(parent, path=file_path)


def measure_read_bandwidth(nbytes: int = 512 << 20, repeats: int = 9) -> dict[str, float]:
    """Read bandwidth in GB/s of a large fp32 torch.sum (all threads): best and median of repeats."""
    x = torch.randn(nbytes // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return {"median_gbps": nbytes / statistics.median(times) / 1e9, "best_gbps": nbytes / min(times) / 1e9}


@pytest.fixture(scope="session")
def read_bandwidth() -> float:
    """This machine's measured read bandwidth (GB/s, best of repeats), taken once per session."""
    if not _BANDWIDTH:
        _BANDWIDTH.update(measure_read_bandwidth())
        _BANDWIDTH["threads"] = torch.get_num_threads()
    return _BANDWIDTH["best_gbps"]


# Read before each "cold" round so the operands of the timed call come from DRAM, as a real
# model's weights do during pruning. lscpu reports a 32 MiB L3 here, but reads of a 4 MB tensor
# keep getting slower as the evicting read grows up to about 128 MiB (this VM's effective
# last-level cache is larger than reported), so 256 MiB are read. A read rather than a write
# leaves clean lines, so the timed call pays no write-backs of the eviction buffer.
EVICT_BYTES = 256 << 20


@pytest.fixture(scope="session")
def evict_caches():
    """evict() -> None: flush the CPU caches by reading a buffer far larger than the last-level cache."""
    buf = torch.ones(EVICT_BYTES // 4)

    def evict() -> None:
        buf.sum()

    return evict


@pytest.fixture(scope="module")
def smollm2_shaped_llama():
    """A random Llama shaped like SmolLM2-135M (hidden 576, 9 query / 3 KV heads, MLP 1536, vocab 49152, tied
    embeddings) with 4 decoder layers: the pruning benchmarks' stand-in for the real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=4, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def bench_record(read_bandwidth):
    """record(benchmark, key, nbytes, **info) -> row: best/median time, GB/s and % of bandwidth.

    The machines are shared and noisy, so GB/s, % of bandwidth and ratios use the best round
    (the least disturbed one) on both sides, the bandwidth too; medians are kept alongside.

    Rows are kept for the session so later benchmarks can compute ratios against earlier ones
    (see bench_lookup) and are printed in the end-of-session table.
    """

    def record(benchmark, key: str, nbytes: int | None = None, **info) -> dict | None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: nothing was timed
            return None
        best, median = stats.stats.min, stats.stats.median
        row = {"key": key, "best_ms": best * 1e3, "median_ms": median * 1e3, **info}
        if nbytes:
            row["gbps"] = nbytes / best / 1e9
            row["pct_bandwidth"] = 100.0 * row["gbps"] / read_bandwidth
            row["gbps_median"] = nbytes / median / 1e9
        benchmark.extra_info.update({k: v for k, v in row.items() if k != "key"})
        benchmark.extra_info["read_bandwidth_gbps"] = read_bandwidth
        _ROWS.append(row)
        return row

    return record


@pytest.fixture
def bench_lookup():
    """lookup(key) -> the recorded row of an earlier benchmark in this session, or None."""

    def lookup(key: str) -> dict | None:
        for row in reversed(_ROWS):
            if row["key"] == key:
                return row
        return None

    return lookup


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    columns = ["key", "best_ms", "gbps", "pct_bandwidth"]
    for row in _ROWS:
        columns += [c for c in row if c not in columns]
    tr = terminalreporter
    tr.section("kernel benchmark summary")
    bw = _BANDWIDTH
    tr.write_line(
        f"read bandwidth (torch.sum of 512 MiB fp32, {bw.get('threads')} threads): "
        f"median {bw.get('median_gbps', 0):.1f} GB/s, best {bw.get('best_gbps', 0):.1f} GB/s"
    )
    table = [columns] + [[_fmt(row.get(c, "")) for c in columns] for row in _ROWS]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for r in table:
        tr.write_line("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))
    try:
        SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
        tmp = SUMMARY_PATH.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"read_bandwidth": bw, "rows": _ROWS}, indent=1))
        os.replace(tmp, SUMMARY_PATH)
        tr.write_line(f"summary written to {SUMMARY_PATH}")
    except OSError as exc:
        tr.write_line(f"could not write {SUMMARY_PATH}: {exc}")
