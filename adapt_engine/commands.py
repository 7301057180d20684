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

from . import precision
from .adapters import DecoderAdapter, count_params
from .args import EvalSettings, PruneRunSettings
from .data import load_text, pool_windows, read_calib_indices, sample_windows, select_windows, tokenize_text
from .devices import resolve_device
from .distributed import Dist, calibration_share, setup_distributed
from .dtypes import parse_dtype
from .evaluate import perplexity
from .importance import calib_compute_dtype
from .models import folder_tokenizer, load_model
from .options import check_output
from .pruner import AdaptPruner
from .report import RunReport, finish_run, peak_memory_mb
from .streaming import StreamedModel, StreamingError, open_streamed, resolve_offload, streamed_perplexity


def _layer_params(adapter) -> list[int]:
    return [adapter.layer_params(j) for j in range(len(adapter.layers))]


def heldout_ids(tokenizer, data: str | None, calib_data: str | None) -> torch.Tensor:
    """Evaluation tokens: the held-out split of the default text, or all of a user-given file."""
    split = "heldout" if data is None or data == calib_data else "all"
    return tokenize_text(tokenizer, load_text(data, split))


def _heldout_ppl(model, eval_ids: torch.Tensor | None, eval_tokens: int,
                 streamed: StreamedModel | None = None, fp32_matmul: str = "ieee") -> dict | None:
    if eval_ids is None:
        return None
    device = streamed.device if streamed is not None else next(model.parameters()).device
    # The prune's own before/after figures may use the calibration's matmul mode (issue 13: 1.9x faster on an
    # AVX512-BF16 EPYC, perplexity within 2e-7 relative of IEEE); `adapt-engine eval` and the search stay IEEE.
    with precision.fp32_matmul(precision.resolve_fp32_matmul(fp32_matmul, device)):
        if streamed is not None:
            return streamed_perplexity(streamed, eval_ids, seq_len=min(512, eval_tokens), batch_size=4)
        return perplexity(model, eval_ids, seq_len=min(512, eval_tokens), batch_size=4)


def _load_for_pruning(cfg: PruneRunSettings, offload: str, device: torch.device):
    """(model, tokenizer, streamed model or None): whole, or as a skeleton whose layers stream from disk."""
    if offload == "none":
        model, tokenizer = load_model(cfg.model, device=str(device), dtype=cfg.dtype)
        return model, tokenizer, None
    if cfg.model is None:
        raise StreamingError("--offload layer reads a model folder with safetensors shards; pass --model DIR "
                             "(the built-in default is a .gguf file and loads whole: use --offload none)")
    folder = Path(cfg.model).expanduser()
    streamed = open_streamed(folder, parse_dtype(cfg.dtype), device)  # refuses anything but a folder, naming it
    return streamed.model, folder_tokenizer(folder), streamed


def _prune_with_progress(pruner: AdaptPruner, target: int, steps: int, calib: torch.Tensor | None,
                         show: bool = True) -> None:
    per_step = calib.shape[0] if calib is not None else 0
    bar = tqdm(total=max(1, steps * max(per_step, 1)), desc="pruning", unit="seq" if per_step else "step",
               file=sys.stderr, dynamic_ncols=True, disable=not show)

    def on_step(rec: dict) -> None:
        if not per_step:
            bar.update(1)
        loss = rec["calib_loss"]
        bar.set_postfix(params=f"{rec['params'] / 1e6:.2f}M", loss=f"{loss:.3f}" if loss is not None else "-")

    try:
        pruner.prune_to(target, steps, progress=(bar.update if per_step else None), on_step=on_step)
    finally:
        bar.close()


def _report_settings(cfg: PruneRunSettings, pruner: AdaptPruner) -> dict:
    """The `settings` block of the prune report (the names and order it has always had; the refit's defaults as
    the pruner resolved them)."""
    settings = {**asdict(cfg.prune), "calib_resample": pruner.resample, "compensate_carry": pruner.carry,
                "compensate_damp": pruner.damp,
                "calib_samples": cfg.calib_samples, "calib_seq_len": cfg.calib_seq_len,
                "calib_data": cfg.calib_data or "pydoc (built-in, train split)", "sparsity": cfg.sparsity,
                "target_params": cfg.target_params, "dtype": cfg.dtype, "device": cfg.device}
    if cfg.calib_indices is not None:  # the windows, not the file name: the report alone says what was used
        settings.update(calib_indices=read_calib_indices(cfg.calib_indices),
                        calib_data=cfg.calib_data or "pydoc (built-in, search pool split)")
        settings["calib_samples"] = len(settings["calib_indices"])
    return settings


def run_prune(cfg: PruneRunSettings) -> RunReport:
    """Check, load, calibrate, prune in T sub-steps, save, report (and bench unless --no-bench).

    Under torchrun every rank scores its share of the calibration batches and the scores are summed
    (``AdaptPruner`` all-reduces them), so every rank makes the same plan; rank 0 evaluates and saves."""
    t_start = time.perf_counter()
    if cfg.from_search is not None:
        from .search import apply_search_result

        cfg = apply_search_result(cfg)
    cfg.validate()
    check_output(cfg.output, overwrite=cfg.overwrite, model=cfg.model, dtype=cfg.dtype)
    torch.manual_seed(cfg.seed)
    d = setup_distributed(str(resolve_device(cfg.device)))
    try:
        return _run_prune(cfg, d, t_start)
    finally:
        if d.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_prune(cfg: PruneRunSettings, d: Dist, t_start: float) -> RunReport:
    offload = resolve_offload(cfg.offload, cfg.model, cfg.dtype, d.device)
    if d.main:
        print(f"loading model {cfg.loading.model_name}"
              f"{' (streamed: one layer at a time)' if offload == 'layer' else ''}"
              f"{f' on {d.world} ranks' if d.world > 1 else ''} ...", file=sys.stderr)
    model, tokenizer, streamed = _load_for_pruning(cfg, offload, d.device)
    adapter = DecoderAdapter(model)
    calib, sampler = None, None
    if cfg.prune.needs_calibration and cfg.calib_indices is not None:
        pool = tokenize_text(tokenizer, load_text(cfg.calib_data, "pool"))
        calib = calibration_share(select_windows(pool_windows(pool, cfg.calib_seq_len),
                                                 read_calib_indices(cfg.calib_indices)), cfg.prune.calib_batch_size, d)
    elif cfg.prune.needs_calibration:
        ids = tokenize_text(tokenizer, load_text(cfg.calib_data, "train"))
        calib = calibration_share(sample_windows(ids, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed),
                                  cfg.prune.calib_batch_size, d)

        def sampler(step: int) -> torch.Tensor:
            # --calib-resample: sub-step i draws with seed + i, fresh windows that are still reproducible.
            windows = sample_windows(ids, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed + step)
            return calibration_share(windows, cfg.prune.calib_batch_size, d)
    eval_ids = None
    if cfg.eval_tokens > 0 and d.main:  # the other ranks would only repeat rank 0's evaluation
        eval_ids = heldout_ids(tokenizer, None, cfg.calib_data)[: cfg.eval_tokens]
    search = None
    if cfg.from_search is not None and d.main:
        from .search import search_validation

        search = search_validation(cfg, tokenizer)
    before = _heldout_ppl(model, eval_ids, cfg.eval_tokens, streamed, cfg.prune.fp32_matmul)
    scratch = None
    if streamed is not None:  # cut layers are rewritten beside the output (same disk), removed at the end
        Path(cfg.output).absolute().parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".adapt-offload-", dir=Path(cfg.output).absolute().parent))
    try:
        report = _prune_and_report(cfg, model, adapter, streamed, scratch, calib, sampler, eval_ids, before, d.main)
        if search is not None:
            _add_search_validation(report, cfg, model, streamed, *search)
        report.wall_seconds = time.perf_counter() - t_start
        report.peak_rss_mb = peak_memory_mb(cfg.device)
        if d.main:
            finish_run(report, model, tokenizer, cfg.output, dense=cfg.loading, bench=not cfg.no_bench,
                       write_weights=streamed.write_weights if streamed is not None else None,
                       standard=cfg.uniform_shape)
        d.barrier()  # every rank leaves together, once rank 0 has saved
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return report


def _prune_and_report(cfg: PruneRunSettings, model, adapter: DecoderAdapter, streamed: StreamedModel | None,
                      scratch: Path | None, calib, sampler, eval_ids, before: dict | None,
                      show_progress: bool = True) -> RunReport:
    """Prune to the target in T sub-steps and measure the result (the report, without the timings)."""
    pruner = AdaptPruner(model, cfg.prune, calib, calib_sampler=sampler, streamed=streamed, scratch=scratch)
    target = cfg.target_params if cfg.target_params is not None else pruner.target_from_sparsity(cfg.sparsity)
    widths_before = [asdict(s) for s in adapter.shapes()]
    details = {"layer_params_before": _layer_params(adapter), "prunable_before": adapter.prunable_params(),
               "hidden_size_before": adapter.hidden_size}
    params_before = count_params(model)
    _prune_with_progress(pruner, target, cfg.prune.steps, calib, show_progress)
    after = _heldout_ppl(model, eval_ids, cfg.eval_tokens, streamed, cfg.prune.fp32_matmul)
    params_after = count_params(model)
    first = next(model.parameters())
    compute = calib_compute_dtype(cfg.prune.calib_dtype, streamed.device if streamed is not None else first.device,
                                  streamed.dtype if streamed is not None else first.dtype)
    details.update(prunable_after=adapter.prunable_params(), layer_params_after=_layer_params(adapter),
                   round_to=cfg.round_to, history=pruner.history, offload="layer" if streamed else "none",
                   hidden_size_after=adapter.hidden_size, calib_compute_dtype=str(compute).removeprefix("torch."))
    if cfg.round_to > 1:
        details["rounding_cost_params"] = params_after - int(target)
    report = RunReport(
        command="prune", model=cfg.loading.model_name, settings=_report_settings(cfg, pruner),
        params_before=params_before, params_after=params_after, target_params=int(target),
        widths_before=widths_before, widths_after=[asdict(s) for s in adapter.shapes()],
        ppl_before=before["ppl"] if before else None, ppl_after=after["ppl"] if after else None,
        ppl_tokens=after["tokens"] if after else None, details=details,
    )
    return report


def _add_search_validation(report: RunReport, cfg: PruneRunSettings, model, streamed: StreamedModel | None,
                           val_ids: torch.Tensor, objective: float) -> None:
    """`--from-search`: the pruned model's perplexity on the search's validation split, beside the best trial's
    objective (equal when --steps and the size are the search's)."""
    ppl = _heldout_ppl(model, val_ids, val_ids.numel(), streamed)["ppl"]  # the search's objective_ppl measure
    report.details.update(from_search=str(cfg.from_search), search_objective=objective, validation_ppl=ppl)
    print(f"validation perplexity {ppl:.4f} (the search's best trial: {objective:.4f})", file=sys.stderr)


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

