"""Every command keeps its flags, defaults, choices, types and either-or groups (read from argparse, not text).

``data/cli_flags.json`` was captured from the hand-written parsers before the settings moved into
dataclasses; help texts may be reworded, everything else must stay as it was.
"""

import json
from pathlib import Path

import pytest
from cli_spec import command_spec

from adapt_engine.cli import build_parser

FIXTURE = Path(__file__).parent / "data" / "cli_flags.json"
# Flags added since the fixture was captured: issue 11 (accel prints the measured speedup unless --no-bench),
# issue 12 (bench in a serving engine), issue 13 (calibration micro-batches and dtype), issue 18 (quality levers;
# accel takes only the layer-importance scale; issue 13 also: the float32 matmul mode), issue 12 part 2 (prune for
# the engine that will serve the model), issue 17 (AdaPruner: prune only some layers, Eq. 5's metric blend, the
# aggregation over a group's members, the calibration windows a search chose), issue 16 (accel's knowledge
# distillation).
CALIB = {"--calib-micro-batch", "--calib-dtype", "--fp32-matmul", "--importance-scale"}
QUALITY = {"--compensate", "--compensate-damp", "--calib-resample", "--mlp-select", "--compensate-carry"}
DEPLOY = {"--deploy-target", "--kv-merge"}
ADAPRUNER = {"--layers", "--aggregate", "--mix-alpha", "--mix-scale"}
DISTILL = {"--distill", "--kd-temperature", "--kd-layer-weight", "--ce-weight", "--teacher-dtype", "--distill-gap",
           "--snapshot-interval", "--distill-final-tokens"}
# Issue 15 (EfficientLLM mode): group types, one global ranking, standard shapes; accel's pruning inside training.
STEM = {"--groups", "--uniform-shape"}
SLICES = {"--prune-every", "--slice-groups"}
ADDED = {"prune": CALIB | QUALITY | DEPLOY | ADAPRUNER | STEM | {"--offload", "--calib-indices", "--from-search"},
         "eval": set(), "bench": {"--engine", "--concurrency"},
         "accel": {"--no-bench"} | CALIB | DEPLOY | ADAPRUNER | DISTILL | STEM | SLICES}
# Choices added to existing flags since the fixture (appended, so the old ones keep their order): issue 17's blend,
# issue 15's global ranking.
ADDED_CHOICES = {"--importance": ["mix"], "--allocation": ["global"]}


def _current() -> dict:
    spec = command_spec(build_parser())
    for command in spec.values():
        for flag in command["flags"].values():
            flag.pop("help")
    return json.loads(json.dumps(spec))  # tuples -> lists, as in the fixture


@pytest.mark.parametrize("command", ["prune", "eval", "bench", "accel"])
def test_flags_defaults_and_choices_are_unchanged(command):
    before = json.loads(FIXTURE.read_text())[command]
    now = _current()[command]
    assert set(now["flags"]) == set(before["flags"]) | ADDED[command]
    for flag, fields in before["flags"].items():
        for key, value in fields.items():
            got = now["flags"][flag][key]
            if key == "choices" and flag in ADDED_CHOICES:
                value = value + ADDED_CHOICES[flag]
            assert got == value, f"{command} {flag}: {key} was {value!r}, now {got!r}"
    assert now["exclusive"] == before["exclusive"]
    assert now["exclusive_required"] == before["exclusive_required"]


def test_every_flag_has_help():
    for name, command in command_spec(build_parser()).items():
        for flag, fields in command["flags"].items():
            assert fields["help"], f"{name} {flag} has no help text"


def test_search_flags():
    """`search` (issue 17) has its own flags plus every prune knob a trial does not choose (steps default 1)."""
    flags = _current()["search"]["flags"]
    own = {"--output", "--model", "--device", "--dtype", "--sparsity", "--target-params", "--trials", "--sampler",
           "--calib-pool", "--calib-k", "--calib-seq-len", "--objective-data", "--objective-tokens", "--storage",
           "--study-name", "--resume", "--overwrite", "--threads"}
    prune = set(_current()["prune"]["flags"])
    chosen = {"--importance", "--mix-alpha", "--mix-scale", "--aggregate", "--calib-resample",
              "--compensate-carry"}
    prune_only = {"--output", "--overwrite", "--no-bench", "--offload", "--eval-tokens", "--calib-data",
                  "--calib-samples", "--calib-seq-len", "--calib-indices", "--from-search", "--model", "--device",
                  "--dtype", "--sparsity", "--target-params"}
    assert set(flags) == own | (prune - chosen - prune_only)
    assert flags["--steps"]["default"] == 1 and flags["--trials"]["default"] == 150
    assert flags["--calib-k"]["default"] == 10 and flags["--calib-seq-len"]["default"] == 128
    assert flags["--objective-tokens"]["default"] == 4096 and flags["--sampler"]["choices"] == ["tpe", "random"]
