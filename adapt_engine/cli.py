"""`adapt-engine` command line: prune, eval, bench, accel, export, search.

Every flag is generated from the settings dataclasses (``settings.add_flags``); the settings validate
themselves before any model is loaded. Errors the user can fix (:class:`AdaptEngineError`) are printed as
one line with exit code 2 (3 for a training run that diverged); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .args import AccelConfig, BenchSettings, EvalSettings, ExportSettings, PruneRunSettings, SearchSettings
from .errors import AdaptEngineError
from .host_memory import bound_kernel_caches
from .settings import add_flags, from_args

COMMANDS = {
    "prune": (PruneRunSettings, "Adapt-Pruner: prune a model to a smaller dense model"),
    "eval": (EvalSettings, "perplexity on held-out text (prints one JSON line)"),
    "bench": (BenchSettings, "latency of dense vs pruned models"),
    "accel": (AccelConfig, "Adapt-Accel: interleaved pruning and training"),
    "export": (ExportSettings, "write a model for vLLM (DeciLM folder) or llama.cpp (GGUF)"),
    "search": (SearchSettings, "AdaPruner: Bayesian search (Optuna) over calibration windows and importance blends"),
}
# Where each command's run function lives. Imported only once the flags are parsed and valid: the engine
# modules import torch (~0.8 s here), which --help and a mistyped flag should not wait for.
RUNNERS = {
    "prune": ("commands", "run_prune"),
    "eval": ("commands", "run_eval"),
    "bench": ("bench", "run_bench"),
    "accel": ("accel", "run_accel"),
    "export": ("export", "run_export"),
    "search": ("search", "run_search"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all sub-commands."""
    parser = argparse.ArgumentParser(prog="adapt-engine", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (settings_class, help_text) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_text), settings_class)
    return parser


def _run(command: str, settings) -> int:
    module, name = RUNNERS[command]
    run = getattr(importlib.import_module(f".{module}", __package__), name)
    result = run(settings)
    return result if isinstance(result, int) else 0  # prune and eval return their report, not an exit code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adapt-engine` console script."""
    bound_kernel_caches()  # before any matmul: the caches read their size once
    args = build_parser().parse_args(argv)
    try:
        return _run(args.command, from_args(COMMANDS[args.command][0], args))
    except AdaptEngineError as err:  # only the package's own errors: a bug keeps its traceback
        print(f"adapt-engine {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)


if __name__ == "__main__":
    sys.exit(main())
