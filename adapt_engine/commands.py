"""What `adapt-engine prune` and `adapt-engine eval` do, callable from Python as well as the CLI."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import DecoderAdapter, count_params
from .args import EvalSettings, PruneRunSettings
from .data import load_text, sample_windows, tokenize_text
from .devices import resolve_device
from .dtypes import parse_dtype
from .evaluate import perplexity
from .models import folder_tokenizer, load_model
from .options import check_output
from .pruner import AdaptPruner
from .report import RunReport, finish_run, peak_memory_mb
from .streaming import StreamedModel, StreamingError, open_streamed, resolve_offload, streamed_perplexity


def _layer_params(adapter) -> list[int]:
    return [adapter.attention_params(j) + adapter.mlp_params(j) for j in range(len(adapter.layers))]


def heldout_ids(tokenizer, data: str | None, calib_data: str | None) -> torch.Tensor:
    """Evaluation tokens: the held-out split of the default text, or all of a user-given file."""
    split = "heldout" if data is None or data == calib_data else "all"
    return tokenize_text(tokenizer, load_text(data, split))


def _heldout_ppl(model, eval_ids: torch.Tensor | None, eval_tokens: int,
                 streamed: StreamedModel | None = None) -> dict | None:
    if eval_ids is None:
        return None
    if streamed is not None:
        return streamed_perplexity(streamed, eval_ids, seq_len=min(512, eval_tokens), batch_size=4)
    return perplexity(model, eval_ids, seq_len=min(512, eval_tokens), batch_size=4)


def _load_for_pruning(cfg: PruneRunSettings, offload: str):
    """(model, tokenizer, streamed model or None): whole, or as a skeleton whose layers stream from disk."""
    if offload == "none":
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        return model, tokenizer, None
    if resolve_device(cfg.device).type != "cpu":
        raise StreamingError("--offload layer runs on the CPU here; use --device cpu (or --offload none)")
    if cfg.model is None:
        raise StreamingError("--offload layer reads a model folder with safetensors shards; pass --model DIR "
                             "(the built-in default is a .gguf file and loads whole: use --offload none)")
    folder = Path(cfg.model).expanduser()
    streamed = open_streamed(folder, parse_dtype(cfg.dtype))  # refuses anything but a folder, naming it
    return streamed.model, folder_tokenizer(folder), streamed


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
    offload = resolve_offload(cfg.offload, cfg.model, cfg.dtype)
    print(f"loading model {cfg.loading.model_name}{' (streamed: one layer at a time)' if offload == 'layer' else ''}"
          " ...", file=sys.stderr)
    model, tokenizer, streamed = _load_for_pruning(cfg, offload)
    adapter = DecoderAdapter(model)
    calib, sampler = None, None
    if cfg.prune.needs_calibration:
        ids = tokenize_text(tokenizer, load_text(cfg.calib_data, "train"))
        calib = sample_windows(ids, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed)

        def sampler(step: int) -> torch.Tensor:
            # --calib-resample: sub-step i draws with seed + i, fresh windows that are still reproducible.
            return sample_windows(ids, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed + step)
    eval_ids = heldout_ids(tokenizer, None, cfg.calib_data)[: cfg.eval_tokens] if cfg.eval_tokens > 0 else None
    before = _heldout_ppl(model, eval_ids, cfg.eval_tokens, streamed)
    scratch = None
    if streamed is not None:  # cut layers are rewritten beside the output (same disk), removed at the end
        Path(cfg.output).absolute().parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".adapt-offload-", dir=Path(cfg.output).absolute().parent))
    try:
        report = _prune_and_report(cfg, model, adapter, streamed, scratch, calib, sampler, eval_ids, before)
        report.wall_seconds = time.perf_counter() - t_start
        report.peak_rss_mb = peak_memory_mb(cfg.device)
        finish_run(report, model, tokenizer, cfg.output, dense=cfg.loading, bench=not cfg.no_bench,
                   write_weights=streamed.write_weights if streamed is not None else None,
                   standard=cfg.uniform_shape)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return report


def _prune_and_report(cfg: PruneRunSettings, model, adapter: DecoderAdapter, streamed: StreamedModel | None,
                      scratch: Path | None, calib, sampler, eval_ids, before: dict | None) -> RunReport:
    """Prune to the target in T sub-steps and measure the result (the report, without the timings)."""
    pruner = AdaptPruner(model, cfg.prune, calib, calib_sampler=sampler, streamed=streamed, scratch=scratch)
    target = cfg.target_params if cfg.target_params is not None else pruner.target_from_sparsity(cfg.sparsity)
    widths_before = [asdict(s) for s in adapter.shapes()]
    details = {"layer_params_before": _layer_params(adapter), "prunable_before": adapter.prunable_params(),
               "hidden_size_before": adapter.hidden_size}
    params_before = count_params(model)
    _prune_with_progress(pruner, target, cfg.prune.steps, calib)
    after = _heldout_ppl(model, eval_ids, cfg.eval_tokens, streamed)
    params_after = count_params(model)
    details.update(prunable_after=adapter.prunable_params(), layer_params_after=_layer_params(adapter),
                   round_to=cfg.round_to, history=pruner.history, offload="layer" if streamed else "none",
                   hidden_size_after=adapter.hidden_size)
    if cfg.round_to > 1:
        details["rounding_cost_params"] = params_after - int(target)
    report = RunReport(
        command="prune", model=cfg.loading.model_name, settings=_report_settings(cfg),
        params_before=params_before, params_after=params_after, target_params=int(target),
        widths_before=widths_before, widths_after=[asdict(s) for s in adapter.shapes()],
        ppl_before=before["ppl"] if before else None, ppl_after=after["ppl"] if after else None,
        ppl_tokens=after["tokens"] if after else None, details=details,
    )
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

