"""A fixed prune run and a fixed accel run on the tiny Llama, whose reports are compared with the ones the
engine wrote before the report became one dataclass (``engine/data/reports.json``)."""

from __future__ import annotations

import json
from pathlib import Path

# Values that differ from run to run (time, memory) or that only name a temporary path.
VOLATILE = {"wall_seconds", "peak_rss_mb", "model", "time", "seconds", "output", "checkpoint_dir"}


def prune_argv(model_dir: Path, out: Path) -> list[str]:
    """`adapt-engine prune` on the tiny model, two sub-steps (plain removal, float32 calibration and one set of
    windows: the fixture predates the --compensate lstsq, --calib-dtype auto and --calib-resample defaults, which
    change the values on purpose)."""
    return ["prune", "--model", str(model_dir), "--output", str(out), "--sparsity", "0.3", "--steps", "2",
            "--calib-samples", "8", "--calib-seq-len", "16", "--eval-tokens", "256", "--no-bench",
            "--compensate", "none", "--calib-dtype", "float32", "--no-calib-resample"]


def accel_argv(model_dir: Path, out: Path) -> list[str]:
    """`adapt-engine accel` on the tiny model: 2 phases, 3 optimizer steps (the fixture was captured before
    accel had --no-bench, when it never benched)."""
    return ["accel", "--model", str(model_dir), "--output", str(out), "--sparsity", "0.4", "--interleaves", "2",
            "--train-tokens", str(24 * 16), "--seq-len", "16", "--global-batch", "8", "--micro-batch", "4",
            "--lr", "2e-3", "--min-lr", "2e-4", "--calib-samples", "8", "--calib-seq-len", "16",
            "--calib-batch-size", "4", "--val-tokens", "128", "--prune-steps", "1", "--no-checkpoints", "--no-bench"]


def stable(report: dict) -> dict:
    """The report without the run-to-run volatile values (recursively)."""
    if isinstance(report, dict):
        return {k: stable(v) for k, v in report.items() if k not in VOLATILE}
    if isinstance(report, list):
        return [stable(v) for v in report]
    return report


def read_report(out: Path) -> dict:
    """The pruning_report.json of an output folder."""
    return json.loads((out / "pruning_report.json").read_text())
