"""The settings declarations: torch-free, so the parser is built without loading the engine."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from adapt_engine import args, cli
from adapt_engine.errors import BenchInputError, UsageError


def test_parser_and_help_load_neither_torch_nor_the_engine():
    code = (
        "import sys\n"
        "from adapt_engine import cli\n"
        "for argv in (['--help'], ['prune', '--help'], ['accel', '--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        cli.build_parser().parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy'))\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY:"


def test_every_command_has_a_runner_that_exists():
    assert set(cli.RUNNERS) == set(cli.COMMANDS)
    for module, name in cli.RUNNERS.values():
        assert callable(getattr(importlib.import_module(f"adapt_engine.{module}"), name))


def test_dtype_names_are_the_loaders_dtypes():
    from adapt_engine.dtypes import DTYPES

    assert list(DTYPES) == list(args.DTYPE_NAMES)
    args.check_dtype("bf16")
    with pytest.raises(UsageError, match="--dtype must be one of"):
        args.check_dtype("float8")


@pytest.mark.parametrize(("sizes", "message"), [
    (([0], [8], 4, 1, 0), "batch sizes"),
    (([1], [], 4, 1, 0), "prompt lengths"),
    (([1], [8], 1, 1, 0), "--new-tokens"),
    (([1], [8], 4, 0, 0), "--repeats"),
    (([1], [8], 4, 1, -1), "--warmup"),
])
def test_check_sizes_names_the_bad_value(sizes, message):
    with pytest.raises(BenchInputError, match=message):
        args.check_sizes(*sizes)
    args.check_sizes([1, 8], [16], 2, 1, 0)
