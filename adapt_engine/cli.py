"""`adapt-engine` command line: prune, eval, bench, accel, export.

Every flag is generated from the settings dataclasses (``settings.add_flags``); the settings validate
themselves before any model is loaded. Errors the user can fix (:class:`AdaptEngineError`) are printed as
one line with exit code 2 (3 for a training run that diverged); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from .accel import AccelConfig, run_accel
from .bench import BenchSettings, run_bench
from .commands import EvalSettings, PruneRunSettings, run_eval, run_prune
from .errors import AdaptEngineError
from .export import ExportSettings, run_export
from .settings import add_flags, from_args

COMMANDS = {
    "prune": (PruneRunSettings, "Adapt-Pruner: prune a model to a smaller dense model"),
    "eval": (EvalSettings, "perplexity on held-out text (prints one JSON line)"),
    "bench": (BenchSettings, "latency of dense vs pruned models"),
    "accel": (AccelConfig, "Adapt-Accel: interleaved pruning and training"),
    "export": (ExportSettings, "write a model for vLLM (DeciLM folder) or llama.cpp (GGUF)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all sub-commands."""
    parser = argparse.ArgumentParser(prog="adapt-engine", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (settings_class, help_text) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_text), settings_class)
    return parser


def _run(command: str, settings) -> int:
    if command == "prune":
        run_prune(settings)
        return 0
    if command == "eval":
        run_eval(settings)
        return 0
    if command == "bench":
        return run_bench(settings)
    if command == "export":
        return run_export(settings)
    return run_accel(settings)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adapt-engine` console script."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args.command, from_args(COMMANDS[args.command][0], args))
    except AdaptEngineError as err:  # only the package's own errors: a bug keeps its traceback
        print(f"adapt-engine {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)


if __name__ == "__main__":
    sys.exit(main())
