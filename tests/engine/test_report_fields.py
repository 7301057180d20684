"""The prune and accel reports keep every field, with the same values, as before the report became one
dataclass (``data/reports.json``, written by the engine before that change; volatile values left out)."""

import json
import os
from pathlib import Path

import pytest
from report_cases import accel_argv, prune_argv, read_report, stable

from adapt_engine.cli import main

FIXTURE = Path(__file__).parent / "data" / "reports.json"
# Fields added since the fixture was captured (documented in README "Commands").
ADDED = {"prune": {"report_version", "command", "ppl_tokens", "offload", "hidden_size_before", "hidden_size_after",
                   "calib_compute_dtype"},
         "accel": {"report_version", "ppl_before", "ppl_after", "ppl_tokens", "params_after", "hidden_size_before",
                   "hidden_size_after"}}

pytestmark = pytest.mark.usefixtures("one_thread")


def _compare(before, now, where: str) -> None:
    if isinstance(before, dict):
        assert isinstance(now, dict), where
        missing = set(before) - set(now)
        assert not missing, f"{where}: fields gone: {sorted(missing)}"
        for k in before:
            _compare(before[k], now[k], f"{where}.{k}")
    elif isinstance(before, list):
        assert isinstance(now, list) and len(now) == len(before), where
        for i, (a, b) in enumerate(zip(before, now)):
            _compare(a, b, f"{where}[{i}]")
    elif isinstance(before, float):
        # 1e-5: the fixture was written on an AMD EPYC (AVX512-BF16); an Intel Xeon's AMX kernels round accel's
        # bf16-autocast steps differently, moving its perplexities by ~3e-6 relative. A lost or renamed field, or
        # a changed algorithm, moves them by far more.
        assert now == pytest.approx(before, rel=1e-5), where
    else:
        assert now == before, f"{where}: was {before!r}, now {now!r}"


def test_prune_and_accel_reports_keep_their_fields(tmp_path, tiny_model_dir):
    reports = {}
    for command, argv in (("prune", prune_argv), ("accel", accel_argv)):
        out = tmp_path / command
        assert main(argv(tiny_model_dir, out)) == 0
        reports[command] = stable(read_report(out))
    if os.environ.get("ADAPT_ENGINE_CAPTURE_REPORTS"):
        FIXTURE.write_text(json.dumps(reports, indent=1, sort_keys=True) + "\n")
    before = json.loads(FIXTURE.read_text())
    for command in ("prune", "accel"):
        _compare(before[command], reports[command], command)
        extra = set(reports[command]) - set(before[command])
        assert extra <= ADDED[command], f"{command}: undocumented new fields {sorted(extra - ADDED[command])}"
