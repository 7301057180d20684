"""Cost of a prune: wall time, peak RSS and the share of each sub-step that is not forward+backward.

Each measurement runs ``adapt-engine prune`` in a child process (peak RSS is that process's
``ru_maxrss``), through a small harness that also times the calibration pass (the forward+backward
over the calibration set) inside every sub-step. Everything else in a sub-step (planning, surgery,
bookkeeping) is the "other" share; loading, perplexity before/after and saving are reported apart.

The anchor setting of issue 13 is::

    adapt-engine prune --target-params 101343744 --steps 16 --calib-samples 64 --calib-seq-len 64 --no-bench

``--baseline DIR`` measures another checkout (e.g. today's main, with its own ``.venv``) in the same
session: each baseline run starts together with the matching candidate run, so both see the same
load from the rest of the machine, and the table gives candidate / baseline ratios, of wall time and of CPU
seconds (``cpu_s``: the process's user + system time, which a loaded machine distorts far less than wall
time; use ``--threads 1`` there so spinning OpenMP threads do not count as work). ``--samples``
lists calibration sizes for the peak-RSS sweep; those runs use ``--rss-steps`` sub-steps (the peak
is reached in the first sub-step, and each later one repeats the same work on a smaller model).

    python benchmarks/bench_prune_cost.py --baseline /work/main --json out/prune_cost.json
    python benchmarks/bench_prune_cost.py --steps 2 --samples 64 256 512 --rss-steps 1

Under pytest (``pytest benchmarks/bench_prune_cost.py --benchmark-only``) it runs only when
``ADAPT_BENCH_PRUNE_COST=1`` is set (an anchor run takes minutes of both cores), with
``ADAPT_BENCH_BASELINE=DIR`` for the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ANCHOR = ["--target-params", "101343744", "--calib-seq-len", "64", "--no-bench"]

# Runs inside the child: time calibration_pass (module global looked up by the pruner at call time),
# run the CLI, print one JSON line with the figures.
HARNESS = r"""
import json, resource, sys, time
import adapt_engine.pruner as pruner
calib, calib_cpu = [], []
original = pruner.calibration_pass
def timed(*args, **kwargs):
    t, c = time.perf_counter(), time.process_time()
    try:
        return original(*args, **kwargs)
    finally:
        calib.append(time.perf_counter() - t)
        calib_cpu.append(time.process_time() - c)
pruner.calibration_pass = timed
from adapt_engine.cli import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - t0
if code != 0:
    sys.exit(code)
usage = resource.getrusage(resource.RUSAGE_SELF)
out = sys.argv[sys.argv.index("--output") + 1]
report = json.load(open(out + "/pruning_report.json"))
steps = [h["seconds"] for h in report["history"]]
print("PRUNE_COST " + json.dumps({
    "exit": code, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
    "cpu_s": usage.ru_utime + usage.ru_stime, "calib_cpu_s": sum(calib_cpu),
    "step_s": sum(steps), "calib_s": sum(calib), "steps": len(steps),
    "ppl_before": report.get("ppl_before"), "ppl_after": report.get("ppl_after"),
    "params_after": report["params_after"], "widths": report["widths_after"]}))
"""


def _python_of(checkout: Path | None) -> str:
    if checkout is None:
        return sys.executable
    py = checkout / ".venv" / "bin" / "python"
    if not py.is_file():
        raise SystemExit(f"--baseline {checkout}: no .venv/bin/python there; run scripts/setup.sh in it first")
    return str(py)


def _start(checkout: Path | None, args: list[str], workdir: Path, tag: str, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if checkout is not None:  # its own C++ build folder: the sources may differ
        env["TORCH_EXTENSIONS_DIR"] = str(workdir / "torch_ext_baseline")
    cmd = [_python_of(checkout), "-c", HARNESS, "prune", *args, "--output", str(workdir / tag), "--overwrite"]
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, tag: str) -> dict:
    out, err = proc.communicate()
    for line in out.splitlines():
        if line.startswith("PRUNE_COST "):
            result = json.loads(line[len("PRUNE_COST "):])
            result["run"] = tag
            return result
    raise RuntimeError(f"{tag}: prune failed (exit {proc.returncode}):\n{err[-4000:]}")


def run_pairs(pairs: list[tuple[str, list[str]]], baseline: Path | None, workdir: Path,
              threads: int | None = None) -> list[dict]:
    """Run each setting for the candidate (and the baseline alongside it); return the results in order."""
    results = []
    for tag, args in pairs:
        procs = [(f"{tag}", _start(None, args, workdir, tag, threads))]
        if baseline is not None:
            procs.append((f"{tag} baseline", _start(baseline, args, workdir, tag + "_baseline", threads)))
        for name, proc in procs:
            results.append(_finish(proc, name))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "widths"}), file=sys.stderr)
    return results


def summarize(results: list[dict]) -> list[dict]:
    """Derived figures per run: the non-forward/backward share of the sub-steps, ratios to the baseline."""
    by_run = {r["run"]: r for r in results}
    rows = []
    for r in results:
        row = {k: r[k] for k in ("run", "wall_s", "cpu_s", "peak_rss_mb", "step_s", "calib_s", "calib_cpu_s",
                                 "ppl_before", "ppl_after", "widths")}
        row["other_share"] = (r["step_s"] - r["calib_s"]) / r["step_s"] if r["step_s"] else None
        base = by_run.get(r["run"] + " baseline")
        if base is not None:
            row["wall_vs_baseline"] = r["wall_s"] / base["wall_s"]
            row["cpu_vs_baseline"] = r["cpu_s"] / base["cpu_s"]
            row["calib_cpu_vs_baseline"] = r["calib_cpu_s"] / base["calib_cpu_s"]
            row["step_vs_baseline"] = r["step_s"] / base["step_s"]
            row["rss_vs_baseline"] = r["peak_rss_mb"] / base["peak_rss_mb"]
            row["ppl_after_vs_baseline"] = r["ppl_after"] / base["ppl_after"] if base["ppl_after"] else None
            row["same_widths_as_baseline"] = r["widths"] == base["widths"]
        rows.append(row)
    return rows


def measure(baseline: Path | None, steps: int, samples: list[int], rss_steps: int, extra: list[str],
            workdir: Path, threads: int | None = None) -> list[dict]:
    """The anchor run at 64 samples plus the peak-RSS sweep over calibration sizes."""
    pairs = [("anchor", [*ANCHOR, "--steps", str(steps), "--calib-samples", "64", *extra])] if steps else []
    for n in samples:
        pairs.append((f"rss@{n}", [*ANCHOR, "--steps", str(rss_steps), "--calib-samples", str(n), *extra]))
    return summarize(run_pairs(pairs, baseline, workdir, threads))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: run the measurements and print the table (and write --json)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", type=Path, default=None, help="another checkout (with .venv) to compare against")
    p.add_argument("--steps", type=int, default=16, help="sub-steps of the anchor run (issue 13: 16; 0: skip it)")
    p.add_argument("--samples", type=int, nargs="*", default=[64, 256, 512], help="calibration sizes for peak RSS")
    p.add_argument("--rss-steps", type=int, default=1, help="sub-steps of each peak-RSS run")
    p.add_argument("--json", type=Path, default=None, help="write the rows here too")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of each prune (1 on a shared machine: CPU seconds then measure work, "
                   "not spinning threads)")
    p.add_argument("extra", nargs="*", help="more prune flags after --, e.g. -- --calib-dtype bfloat16")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prune_cost_") as tmp:
        rows = measure(a.baseline, a.steps, a.samples, a.rss_steps, a.extra, Path(tmp), a.threads)
    print(json.dumps(rows, indent=1))
    if a.json is not None:
        from adapt_engine.fsio import atomic_write_json

        a.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.json, rows, indent=1)
    return 0


def test_prune_cost(benchmark):
    """The anchor prune (and the RSS sweep) as a one-round benchmark; ratios in extra_info."""
    import pytest

    if os.environ.get("ADAPT_BENCH_PRUNE_COST") != "1":
        pytest.skip("set ADAPT_BENCH_PRUNE_COST=1 (and ADAPT_BENCH_BASELINE=DIR) to run the prune-cost benchmark")
    baseline = os.environ.get("ADAPT_BENCH_BASELINE")
    with tempfile.TemporaryDirectory(prefix="prune_cost_") as tmp:
        rows = benchmark.pedantic(
            measure, args=(Path(baseline) if baseline else None, 16, [64, 256, 512], 1, [], Path(tmp)),
            rounds=1, iterations=1,
        )
    for row in rows:
        for key, value in row.items():
            if key != "run":
                benchmark.extra_info[f"{row['run']} {key}"] = value


if __name__ == "__main__":
    sys.exit(main())
