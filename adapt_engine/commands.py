"""What `adapt-engine prune` and `adapt-engine eval` do, callable from Python as well as the CLI."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .adapters import DecoderAdapter, count_params
from .data import load_text, sample_windows, tokenize_text
from .evaluate import perplexity
from .models import load_model
from .options import CalibSettings, ModelSettings, SizeSettings, check_output
from .pruner import AdaptPruner, PruneSettings
from .report import RunReport, finish_run, peak_memory_mb
from .settings import CommandSettings, nested, setting


@dataclass
class PruneRunSettings(CommandSettings):
    """Everything `adapt-engine prune` can be told."""

    output: str = setting(math=False, help="folder for the pruned model (written atomically)")
    loading: ModelSettings = nested(ModelSettings)
    size: SizeSettings = nested(SizeSettings)
    prune: PruneSettings = nested(PruneSettings)
    calib: CalibSettings = nested(CalibSettings)
    eval_tokens: int = setting(8192, minimum=0,
                               help="held-out tokens for before/after perplexity in the report (0 = skip)")
    overwrite: bool = setting(False, math=False, help="replace a non-empty --output folder")
    no_bench: bool = setting(False, math=False, help="skip the short latency bench at the end")


@dataclass
class EvalSettings(CommandSettings):
    """Everything `adapt-engine eval` can be told."""

    loading: ModelSettings = nested(ModelSettings)
    data: str | None = setting(None, help="text file/dataset (default: built-in held-out split)")
    seq_len: int = setting(512, minimum=2, help="tokens per evaluation window")
    batch_size: int = setting(4, minimum=1, help="windows per forward pass")
    max_tokens: int | None = setting(None, minimum=1, help="evaluate at most this many tokens")


def _layer_params(adapter) -> list[int]:
    return [adapter.attention_params(j) + adapter.mlp_params(j) for j in range(len(adapter.layers))]


def heldout_ids(tokenizer, data: str | None, calib_data: str | None) -> torch.Tensor:
    """Evaluation tokens: the held-out split of the default text, or all of a user-given file."""
    split = "heldout" if data is None or data == calib_data else "all"
    return tokenize_text(tokenizer, load_text(data, split))


def _heldout_ppl(model, eval_ids: torch.Tensor | None, eval_tokens: int) -> dict | None:
    if eval_ids is None:
        return None
    return perplexity(model, eval_ids, seq_len=min(512, eval_tokens), batch_size=4)


def _prune_with_progress(pruner: AdaptPruner, target: int, steps: int, calib: torch.Tensor | None) -> None:
    per_step = calib.shape[0] if calib is not None else 0
    bar = tqdm(total=max(1, steps * max(per_step, 1)), desc="pruning", unit="seq" if per_step else "step",
               file=sys.stderr, dynamic_ncols=True)

    def on_step(rec: dict) -> None:
        if not per_step:
            bar.update(1)
        loss = rec["calib_loss"]
        bar.set_postfix(params=f"{rec['params'] / 1e6:.2f}M", loss=f"{loss:.3f}" if loss is not None else "-")

    try:
        pruner.prune_to(target, steps, progress=(bar.update if per_step else None), on_step=on_step)
    finally:
        bar.close()


def _report_settings(cfg: PruneRunSettings) -> dict:
    """The `settings` block of the prune report (the names and order it has always had)."""
    return {**asdict(cfg.prune), "calib_samples": cfg.calib_samples, "calib_seq_len": cfg.calib_seq_len,
            "calib_data": cfg.calib_data or "pydoc (built-in, train split)", "sparsity": cfg.sparsity,
            "target_params": cfg.target_params, "dtype": cfg.dtype, "device": cfg.device}


def run_prune(cfg: PruneRunSettings) -> RunReport:
    """Check, load, calibrate, prune in T sub-steps, save, report (and bench unless --no-bench)."""
    t_start = time.perf_counter()
    cfg.validate()
    check_output(cfg.output, overwrite=cfg.overwrite, model=cfg.model, dtype=cfg.dtype)
    torch.manual_seed(cfg.seed)
    print(f"loading model {cfg.loading.model_name} ...", file=sys.stderr)
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    adapter = DecoderAdapter(model)
    calib, sampler = None, None
    if cfg.prune.needs_calibration:
        ids = tokenize_text(tokenizer, load_text(cfg.calib_data, "train"))
        calib = sample_windows(ids, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed)

        def sampler(step: int) -> torch.Tensor:
            # --calib-resample: sub-step i draws with seed + i, fresh windows that are still reproducible.
            return sample_windows(ids, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed + step)
    eval_ids = heldout_ids(tokenizer, None, cfg.calib_data)[: cfg.eval_tokens] if cfg.eval_tokens > 0 else None
    before = _heldout_ppl(model, eval_ids, cfg.eval_tokens)
    pruner = AdaptPruner(model, cfg.prune, calib, calib_sampler=sampler)
    target = cfg.target_params if cfg.target_params is not None else pruner.target_from_sparsity(cfg.sparsity)
    widths_before = [asdict(s) for s in adapter.shapes()]
    details = {"layer_params_before": _layer_params(adapter), "prunable_before": adapter.prunable_params()}
    params_before = count_params(model)
    _prune_with_progress(pruner, target, cfg.prune.steps, calib)
    after = _heldout_ppl(model, eval_ids, cfg.eval_tokens)
    params_after = count_params(model)
    details.update(prunable_after=adapter.prunable_params(), layer_params_after=_layer_params(adapter),
                   round_to=cfg.round_to, history=pruner.history)
    if cfg.round_to > 1:
        details["rounding_cost_params"] = params_after - int(target)
    report = RunReport(
        command="prune", model=cfg.loading.model_name, settings=_report_settings(cfg),
        params_before=params_before, params_after=params_after, target_params=int(target),
        widths_before=widths_before, widths_after=[asdict(s) for s in adapter.shapes()],
        ppl_before=before["ppl"] if before else None, ppl_after=after["ppl"] if after else None,
        ppl_tokens=after["tokens"] if after else None, details=details,
    )
    report.wall_seconds = time.perf_counter() - t_start
    report.peak_rss_mb = peak_memory_mb(cfg.device)
    finish_run(report, model, tokenizer, cfg.output, dense=cfg.loading, bench=not cfg.no_bench)
    return report


def run_eval(cfg: EvalSettings) -> dict:
    """Perplexity of a model on held-out text; prints one JSON line."""
    cfg.validate()
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    ids = heldout_ids(tokenizer, cfg.data, None)
    result = perplexity(model, ids, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens)
    result = {"ppl": result["ppl"], "params": count_params(model), "tokens": result["tokens"],
              "nll": result["nll"], "seq_len": cfg.seq_len, "model": cfg.model or "default",
              "data": cfg.data or "pydoc (built-in, held-out split)"}
    print(json.dumps(result))
    return result

