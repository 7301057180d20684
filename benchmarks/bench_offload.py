"""Streamed pruning (``prune --offload layer``) against the in-memory path: wall time, peak RSS, bytes read.

Each run is ``adapt-engine prune`` in its own child process, one sub-step on 8 × 64 calibration tokens (the
issue-14 setting); the child reports its own peak RSS (``ru_maxrss``) and the bytes it read from storage
(``/proc/self/io``). Models come from ``scripts/make_random_model.py`` (random Llama-3 shapes, bf16).

    python scripts/make_random_model.py --shape llama-3.2-1b --output /scratch/llama-1b
    python benchmarks/bench_offload.py --models /scratch/llama-1b /scratch/llama-3b --dtype bfloat16 \\
        --json out/offload.json

``--inmemory-max-gb`` skips the in-memory run of models whose weights at ``--dtype`` exceed it (it would not
fit). Under pytest (``pytest benchmarks/bench_offload.py --benchmark-only``) it runs only with
``ADAPT_BENCH_OFFLOAD_MODELS`` set to the model folders (colon-separated): each run takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTING = ["--steps", "1", "--calib-samples", "8", "--calib-seq-len", "64", "--sparsity", "0.2",
           "--eval-tokens", "0", "--no-bench"]

# Runs inside the child: the CLI, then one JSON line with its own peak RSS and bytes read.
HARNESS = r"""
import json, resource, sys, time
from adapt_engine.cli import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - t0
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print("BENCH " + json.dumps({"code": code, "wall_s": wall, "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "read_bytes": int(io["read_bytes"]), "rchar": int(io["rchar"])}))
"""


def weight_bytes(folder: Path, dtype: str) -> int:
    """Bytes of the model's weights at ``dtype`` (from the safetensors headers)."""
    from adapt_engine.models import estimate_model_bytes

    return estimate_model_bytes(str(folder), dtype) or 0


def run_prune(model: Path, offload: str, dtype: str, extra: list[str]) -> dict:
    """One prune in a child process; its figures."""
    with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
        argv = ["prune", "--model", str(model), "--output", str(Path(tmp) / "out"), "--offload", offload,
                "--dtype", dtype, *SETTING, *extra]
        proc = subprocess.run([sys.executable, "-c", HARNESS, *argv], capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"prune --offload {offload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH "):])


def measure(models: list[Path], dtype: str, inmemory_max_gb: float, extra: list[str], rounds: int = 1,
            order: tuple[str, ...] = ("layer", "none")) -> list[dict]:
    """Rows of (model, offload, figures), ``rounds`` times in ``order``; the in-memory run where the weights fit
    ``inmemory_max_gb``. Later rounds find the weights in the page cache, as the second run of a round does."""
    rows = []
    for model, _ in [(m, r) for m in models for r in range(rounds)]:
        size = weight_bytes(model, dtype)
        for offload in order:
            if offload == "none" and size > inmemory_max_gb * 2**30:
                rows.append({"model": model.name, "offload": offload, "skipped": f"{size / 2**30:.1f} GB of weights"})
                continue
            row = {"model": model.name, "offload": offload, "weight_gb": round(size / 2**30, 2),
                   **run_prune(model, offload, dtype, extra)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table with the layer/none ratios where both ran."""
    out = ["| model | weights GB | offload | wall s | peak RSS MB | read GB | wall × in-memory |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    inmem = {r["model"]: r for r in rows if r["offload"] == "none" and "wall_s" in r}  # the last round's
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['model']} | | none | skipped ({r['skipped']}) | | | |")
            continue
        ratio = f"{r['wall_s'] / inmem[r['model']]['wall_s']:.2f}" if r["model"] in inmem else "–"
        out.append(f"| {r['model']} | {r['weight_gb']} | {r['offload']} | {r['wall_s']:.1f} | "
                   f"{r['peak_rss_mb']:.0f} | {r['read_bytes'] / 2**30:.2f} | {ratio} |")
    return "\n".join(out)


def test_offload_cost(benchmark):
    """pytest-benchmark entry: one round over the folders in ADAPT_BENCH_OFFLOAD_MODELS."""
    import pytest

    folders = os.environ.get("ADAPT_BENCH_OFFLOAD_MODELS")
    if not folders:
        pytest.skip("set ADAPT_BENCH_OFFLOAD_MODELS=DIR[:DIR...] (models from scripts/make_random_model.py)")
    models = [Path(f) for f in folders.split(":")]
    rows = benchmark.pedantic(measure, args=(models, "bfloat16", 8.0, []), rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    print(table(rows))


def main() -> int:
    """Command line of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", required=True, type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--inmemory-max-gb", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=1, help="measure each model this many times")
    parser.add_argument("--first", choices=("layer", "none"), default="layer", help="which mode runs first in a round")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("extra", nargs="*", help="more prune flags after --, e.g. -- --compensate none")
    args = parser.parse_args()
    order = ("layer", "none") if args.first == "layer" else ("none", "layer")
    rows = measure(args.models, args.dtype, args.inmemory_max_gb, args.extra, args.rounds, order)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
