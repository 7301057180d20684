"""`adapt-engine` command line: prune, eval, bench, accel."""

from __future__ import annotations

import argparse
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="transformers folder, hub id, .gguf file or pruned output (default: built-in SmolLM2-135M)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--output", required=True, help="folder for the pruned model (written atomically)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--sparsity", type=float, help="fraction of prunable (attention+MLP) weights to remove")
    size.add_argument("--target-params", type=int, help="total parameter count wanted")
    p.add_argument("--amplitude", type=float, default=0.02, help="A in the per-layer shift A*I_j")
    p.add_argument("--steps", type=int, default=50, help="sub-steps T of Algorithm 1 (default 50)")
    p.add_argument("--allocation", choices=("adaptive", "uniform"), default="adaptive")
    p.add_argument("--layer-update", choices=("incremental", "absolute"), default="incremental",
                   help="per-layer sparsity at each sub-step: move it by the step's increment minus A*I_j, as the "
                   "authors' code does (default), or set it to S_cur - A*I_j (the paper's Eq. 6)")
    p.add_argument("--importance", choices=("taylor", "magnitude", "random", "vectorize", "param_mix"),
                   default="taylor", help="group saliency (default taylor = |dL/dW * W|)")
    p.add_argument("--similarity", choices=("cosine", "euclidean", "manhattan"), default="cosine")
    p.add_argument("--attention", choices=("query", "kv"), default="query",
                   help="attention granularity: same number of query heads per KV group, or whole KV groups")
    p.add_argument("--split", choices=("saliency", "proportional"), default="saliency",
                   help="inside a layer, remove attention units only where they are less salient than the MLP "
                   "channels they would spare (default), or give attention its proportional share")
    p.add_argument("--round-to", type=int, default=1, help="make every MLP width a multiple of K")
    p.add_argument("--compensate", choices=("none", "bias", "lstsq"), default="lstsq",
                   help="after each cut, refit down_proj/o_proj's kept columns by ridge least squares on the "
                   "calibration activations (lstsq, default), add the removed channels' mean output to their bias "
                   "(bias, models with o/down biases only), or nothing (none, the paper's)")
    p.add_argument("--compensate-damp", type=float, default=0.01,
                   help="ridge of --compensate lstsq, relative to the mean diagonal of the kept channels' Gram "
                   "matrix (default 0.01; larger = closer to plain removal)")
    p.add_argument("--calib-resample", action=argparse.BooleanOptionalAction, default=False,
                   help="draw fresh calibration windows at every sub-step (as the authors' code does) instead of "
                   "reusing one fixed set (--no-calib-resample, default)")
    p.add_argument("--importance-scale", choices=("max", "robust", "rank"), default="max",
                   help="layer-importance normalisation: divide by max |I| (max, the paper's), median/MAD with "
                   "outliers clipped (robust), or evenly spaced ranks (rank); see docs/quality.md")
    p.add_argument("--calib-data", default=None, help=".txt/.jsonl/.parquet file or folder, or a datasets name "
                   "(default: built-in offline text, train split)")
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--calib-seq-len", type=int, default=64)
    p.add_argument("--calib-batch-size", type=int, default=32, help="sequences per forward/backward")
    p.add_argument("--eval-tokens", type=int, default=8192,
                   help="held-out tokens for before/after perplexity in the report (0 = skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    p.add_argument("--no-bench", action="store_true", help="skip the short latency bench at the end")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all sub-commands."""
    parser = argparse.ArgumentParser(prog="adapt-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune_args(sub.add_parser("prune", help="Adapt-Pruner: prune a model to a smaller dense model"))

    ev = sub.add_parser("eval", help="perplexity on held-out text (prints one JSON line)")
    _add_model_args(ev)
    ev.add_argument("--data", default=None, help="text file/dataset (default: built-in held-out split)")
    ev.add_argument("--seq-len", type=int, default=512)
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")

    from .accel import add_accel_arguments
    from .bench import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="latency of dense vs pruned models"))
    add_accel_arguments(sub.add_parser("accel", help="Adapt-Accel: interleaved pruning and training"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adapt-engine` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prune":
            from .commands import run_prune

            run_prune(args)
            return 0
        if args.command == "eval":
            from .commands import run_eval

            run_eval(args)
            return 0
        if args.command == "bench":
            from .bench import run_bench

            return run_bench(args)
        if args.command == "accel":
            from .accel import run_accel

            return run_accel(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"adapt-engine {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
