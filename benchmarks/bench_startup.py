"""Start-up time of `adapt-engine --help` (and `prune --help`) against other checkouts, in alternating runs.

Each run is a fresh Python that imports the CLI from the given source tree and prints the help; the trees
take turns so that load from the rest of the machine hits them alike. Medians and minima per tree:

    git archive 92337be | tar -x -C /tmp/old
    python benchmarks/bench_startup.py --trees old=/tmp/old new=. --runs 10

Under pytest (``pytest benchmarks/bench_startup.py --benchmark-only``) it times this checkout's `--help`
against a bare ``python -c pass`` in the same session and records the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def help_seconds(tree: Path, argv: list[str]) -> float:
    """Wall time of one fresh process printing the help of the CLI in ``tree``."""
    code = (f"import sys; sys.path.insert(0, {str(tree)!r}); from adapt_engine.cli import main; "
            f"sys.argv = ['adapt-engine', *{argv!r}]; main()")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def compare(trees: dict[str, Path], argv: list[str], runs: int) -> dict[str, dict]:
    """Median and minimum seconds per tree, the trees alternating run by run."""
    times: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(runs):
        for name, tree in trees.items():
            times[name].append(help_seconds(tree, argv))
    return {name: {"median_s": statistics.median(v), "min_s": min(v)} for name, v in times.items()}


def test_help_startup(benchmark):
    """`adapt-engine --help` vs a bare interpreter start, as a ratio."""
    bare = min(_bare() for _ in range(3))
    seconds = benchmark.pedantic(help_seconds, args=(ROOT, ["--help"]), rounds=5, iterations=1)
    benchmark.extra_info["bare_python_s"] = bare
    benchmark.extra_info["ratio_to_bare_python"] = (seconds or benchmark.stats.stats.min) / bare


def _bare() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def main() -> int:
    """Command line of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", nargs="+", default=[f"this={ROOT}"], help="NAME=DIR source trees to compare")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--command", default="--help", help="the argv as one string, e.g. --command='prune --help'")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees)
    for name, row in compare({k: Path(v) for k, v in trees.items()}, args.command.split(), args.runs).items():
        print(f"{name}: median {row['median_s']:.3f} s, min {row['min_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
