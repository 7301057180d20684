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
# accel takes only the layer-importance scale), issue 12 part 2 (prune for the engine that will serve the model).
CALIB = {"--calib-micro-batch", "--calib-dtype", "--importance-scale"}
QUALITY = {"--compensate", "--compensate-damp", "--calib-resample"}
DEPLOY = {"--deploy-target", "--kv-merge"}
# Issue 15 (EfficientLLM mode): group types, one global ranking, standard shapes.
STEM = {"--groups", "--uniform-shape"}
ADDED = {"prune": CALIB | QUALITY | DEPLOY | STEM | {"--offload"}, "eval": set(),
         "bench": {"--engine", "--concurrency"}, "accel": {"--no-bench"} | CALIB | DEPLOY | STEM}
# Choices added since the fixture was captured (issue 15).
ADDED_CHOICES = {"--allocation": ["global"]}


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
