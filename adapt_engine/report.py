"""The one report of a run (`prune` and `accel` alike): its versioned dataclass, the plain-text summary, the
per-layer chart, and the end every command shares (write, print, measured speedup)."""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .args import ModelSettings
from .bench import format_quick_speedup, quick_speedup
from .fsio import atomic_write
from .models import load_model
from .saving import save_pruned

REPORT_VERSION = 2  # 1: the separate prune/accel dicts (accel had only ppl_initial/ppl_final)


@dataclass
class RunReport:
    """What a run did, as written to ``pruning_report.json`` (``details`` go to the top level as well)."""

    command: str
    model: str
    settings: dict
    params_before: int
    params_after: int
    target_params: int
    widths_before: list[dict]
    widths_after: list[dict]
    ppl_before: float | None = None
    ppl_after: float | None = None
    ppl_tokens: int | None = None
    wall_seconds: float = 0.0
    peak_rss_mb: float | None = None
    details: dict = field(default_factory=dict)
    report_version: int = REPORT_VERSION

    def to_dict(self) -> dict:
        """The JSON form: every field, the command's ``details`` inlined, accel's former perplexity names kept."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        out.update(self.details)
        if self.command == "accel":  # the names accel reports used before version 2
            out.update(ppl_initial=self.ppl_before, ppl_final=self.ppl_after)
        return out

    @property
    def history(self) -> list[dict]:
        """Algorithm-1 sub-step records (prune: ``history``, accel: ``prune_history``)."""
        return self.details.get("history", self.details.get("prune_history", []))


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MB."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report_dict(report: RunReport | dict) -> dict:
    """A report as its JSON dict (already-dict reports pass through)."""
    return report.to_dict() if isinstance(report, RunReport) else dict(report)


def _fmt(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n >= 1e6 else f"{n:,}"


def _ppl(x: float | None) -> str:
    return f"{x:.3f}" if x is not None else "-"


GROUP_TYPES_SHOWN = ("heads", "mlp", "stem")


def removal_order(history: list[dict]) -> list[list]:
    """The group types in the order ``--allocation global`` removed them, over all sub-steps, as
    ``[[type, groups in a row], ...]`` (empty for the other allocations)."""
    out: list[list] = []
    for rec in history:
        for kind, count in rec.get("removal_order", []):
            if out and out[-1][0] == kind:
                out[-1][1] += count
            else:
                out.append([kind, count])
    return out


def _order_text(order: list[list], limit: int = 12) -> str:
    runs = [f"{kind} x{count}" for kind, count in order]
    return ", ".join(runs[:limit]) + (f", ... ({len(runs) - limit} more runs)" if len(runs) > limit else "")


def _summary_lines(r: dict) -> list[str]:
    before, after, target = r["params_before"], r["params_after"], r["target_params"]
    lines = [
        "", f"adapt-engine {r['command']} report", "=" * 64,
        f"model          {r['model']}",
        "settings       " + ", ".join(f"{k}={v}" for k, v in r["settings"].items()),
        f"parameters     {_fmt(before)} -> {_fmt(after)}  ({100 * (1 - after / before):.2f}% fewer; "
        f"target {_fmt(target)}, off by {after - target:+,})",
    ]
    if "prunable_before" in r:
        pb, pa = r["prunable_before"], r["prunable_after"]
        lines.append(f"prunable       {_fmt(pb)} -> {_fmt(pa)}  (sparsity {100 * (1 - pa / pb):.2f}%)")
    if r.get("hidden_size_before") is not None:
        lines.append(f"hidden size    {r['hidden_size_before']} -> {r.get('hidden_size_after')}")
    if r.get("calib_compute_dtype"):
        lines.append(f"calibration    computed in {r['calib_compute_dtype']}")
    history = r.get("history") or r.get("prune_history") or []
    order = removal_order(history)
    if order:
        totals = {k: sum(rec.get("removed_params", {}).get(k, 0) for rec in history) for k in GROUP_TYPES_SHOWN}
        lines.append("removed        " + ", ".join(f"{k} {_fmt(v)}" for k, v in totals.items() if v)
                     + " parameters")
        lines.append(f"removal order  {_order_text(order)}")
    if "optimizer_steps" in r:
        lines.append(f"training       {r['tokens_used']:,} tokens in {r['optimizer_steps']} optimizer steps")
    slices = r.get("slices")
    if slices:  # accel --prune-every
        last = slices[-1]
        lines.append(f"slices         {len(slices)} (after steps {slices[0]['global_step']}..{last['global_step']}, "
                     f"{sum(x['groups'] for x in slices):,} groups); the last removed {last['groups']:,}"
                     + (" to land on the target (the schedule had not reached it)" if last["forced"] else ""))
    peak = r.get("peak_rss_mb")
    lines.append(f"wall time      {r['wall_seconds']:.1f} s" + (f"  (peak RSS {peak:,.0f} MB)" if peak else ""))
    if r.get("round_to", 1) > 1:
        lines.append(f"round-to       {r['round_to']} (cost vs. exact target: "
                     f"{r.get('rounding_cost_params', 0):+,} params)")
    if r.get("ppl_before") is not None or r.get("ppl_after") is not None:
        tokens = f", {r['ppl_tokens']:,} tokens" if r.get("ppl_tokens") else ""
        lines.append(f"perplexity     {_ppl(r.get('ppl_before'))} -> {_ppl(r.get('ppl_after'))} (held-out{tokens})")
    return lines


def _teacher(t: dict) -> str:
    if t.get("sequence"):  # accel --distill-final-tokens: every snapshot in turn
        return f"{len(t['sequence'])} snapshots growing to {t['name']} ({t['params']:,} params)"
    return f"{t['name']} ({t['params']:,} params)"


def _phase_lines(r: dict) -> list[str]:
    teachers = any(ph.get("teacher") for ph in r["phases"])  # accel --distill: the teacher of each phase
    head = f"{'phase':>5} {'params':>12} {'steps':>6} {'tokens':>9} {'ppl':>9}"
    lines = ["", head + ("  teacher" if teachers else "")]
    for ph in r["phases"]:
        t = ph.get("teacher")
        lines.append(f"{ph['phase'] + 1:>5} {ph['params']:>12,} {ph['steps']:>6} {ph['tokens']:>9,} "
                     f"{_ppl(ph['ppl']):>9}" + (f"  {_teacher(t)}" if t else ""))
    return lines


def _layer_lines(r: dict, history: list[dict]) -> list[str]:
    per_layer = "layer_params_before" in r
    lines = ["", f"{'layer':>5} {'heads':>9} {'kv':>6} {'mlp':>11}"
             + (f" {'sparsity':>9} {'importance':>11}" if per_layer else "")]
    imp = history[-1]["layer_importance"] if history else [0.0] * len(r["widths_before"])
    for j, (o, n) in enumerate(zip(r["widths_before"], r["widths_after"])):
        line = (f"{j:>5} {o['num_heads']:>3}->{n['num_heads']:<3} {o['num_kv_heads']:>2}->{n['num_kv_heads']:<2} "
                f"{o['intermediate_size']:>5}->{n['intermediate_size']:<5}")
        if per_layer:
            lp_b, lp_a = r["layer_params_before"][j], r["layer_params_after"][j]
            line += f" {100 * (1 - lp_a / lp_b):>8.1f}% {imp[j]:>+11.3f}"
        lines.append(line)
    return lines


def format_report(report: RunReport | dict) -> str:
    """The plain-text summary every command prints at its end: totals, phases (accel), per-layer widths."""
    r = report_dict(report)
    history = r.get("history") or r.get("prune_history") or []
    lines = _summary_lines(r)
    if "phases" in r:
        lines += _phase_lines(r)
    return "\n".join(lines + _layer_lines(r, history))


def plot_report(report: RunReport | dict, path: str | Path) -> Path:
    """PNG with per-layer widths (before/after) and layer importance across sub-steps; written atomically."""
    report = report_dict(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(report["widths_after"])
    layers = list(range(n))
    hist = report.get("history") or report.get("prune_history") or []
    by_type = any("removed_params" in rec for rec in hist)
    if by_type:  # a fourth panel over sub-steps, not layers: it shares no x axis with the others
        fig = plt.figure(figsize=(10, 13))
        first = fig.add_subplot(4, 1, 1)
        axes = [first, fig.add_subplot(4, 1, 2, sharex=first), fig.add_subplot(4, 1, 3, sharex=first),
                fig.add_subplot(4, 1, 4)]
    else:
        fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for key, ax, label in (("intermediate_size", axes[0], "MLP channels"), ("num_heads", axes[1], "query heads")):
        ax.bar(layers, [w[key] for w in report["widths_before"]], color="#ccc", label="before")
        ax.bar(layers, [w[key] for w in report["widths_after"]], color="#3a7", label="after")
        ax.set_ylabel(label)
        ax.legend(loc="lower right")
    cmap = plt.get_cmap("viridis")
    for i, rec in enumerate(hist):
        axes[2].plot(layers, rec["layer_importance"], color=cmap(i / max(1, len(hist) - 1)), lw=1,
                     label=f"step {i + 1}" if i in (0, len(hist) - 1) else None)
    axes[2].set_ylabel("normalised layer importance")
    axes[2].set_xlabel("decoder layer")
    axes[2].axhline(0, color="k", lw=0.5)
    if hist:
        axes[2].legend(loc="best")
    if by_type:
        _plot_removal_by_type(axes[3], hist, report.get("hidden_size_before"))
    fig.suptitle(f"{report['model']}: {report['params_before']:,} -> {report['params_after']:,} params")
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_removal_by_type(ax, history: list[dict], hidden_before: int | None) -> None:
    """EfficientLLM Fig. 5 style: parameters removed per sub-step by group type (stacked), hidden size on the right."""
    steps = list(range(1, len(history) + 1))
    bottom = [0.0] * len(history)
    for kind, color in zip(GROUP_TYPES_SHOWN, ("#c53", "#37a", "#3a7")):
        values = [rec.get("removed_params", {}).get(kind, 0) / 1e6 for rec in history]
        ax.bar(steps, values, bottom=bottom, color=color, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("pruning sub-step (accel --prune-every: slice)")
    ax.set_ylabel("parameters removed (M)")
    ax.legend(loc="upper left")
    hidden = [rec.get("hidden_size") for rec in history]
    if hidden_before is not None and all(h is not None for h in hidden):
        twin = ax.twinx()
        twin.plot([0, *steps], [hidden_before, *hidden], "k.-", lw=1)
        twin.set_ylabel("hidden size")


def plot_progress(records: list[dict], path: Path) -> Path:
    """PNG: training loss and parameter count over tokens, held-out perplexity per phase (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval" and r.get("ppl") is not None]
    # Parameter count as a staircase: the original size, then the size after each prune.
    sizes = [(0, r["params"]) for r in records if r["event"] == "eval" and r["phase"] == -1]
    sizes += [(r["tokens"], r["params"]) for r in records if r["event"] in ("prune", "slice")]
    if steps:
        sizes.append((steps[-1]["tokens"], steps[-1]["params"]))
    fig, (ax1, ax3) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    ax1.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], color="#37a", lw=1, label="training loss")
    ax1.set_ylabel("training loss")
    ax2 = ax1.twinx()
    ax2.step([x for x, _ in sizes], [n / 1e6 for _, n in sizes], where="post", color="#c53", lw=1.5,
             label="parameters")
    ax2.set_ylabel("parameters (M)")
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax1.legend(lines, [str(h.get_label()) for h in lines], loc="upper right")
    ax3.plot([r.get("tokens_total", 0) for r in evals], [r["ppl"] for r in evals], "o-", color="#3a7")
    ax3.set_ylabel("held-out perplexity")
    ax3.set_xlabel("training tokens")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def finish_run(report: RunReport, model, tokenizer, output: str | Path, *, dense: ModelSettings, bench: bool,
               extra: Callable[[Path], None] | None = None,
               write_weights: Callable[[Path], None] | None = None, standard: bool = False) -> Path:
    """The end of `prune` and `accel`: save the model with its report and chart, print the report, and (unless
    --no-bench) the measured speedup over the dense model. ``write_weights`` saves a streamed model's weights
    (no bench then: it would load both models whole). ``standard`` saves a plain model of its family
    (--uniform-shape)."""
    out = save_pruned(model, tokenizer, output, report.to_dict(), write_weights=write_weights, standard=standard)
    if extra is not None:
        extra(out)
    plot_report(report, out / "pruning_report.png")
    print(format_report(report))
    remote = "" if standard else ", trust_remote_code=True"
    print(f"\nsaved to {out}  (reload: adapt_engine.load_pruned('{out}') or "
          f"AutoModelForCausalLM.from_pretrained('{out}'{remote}))")
    if bench and write_weights is not None:
        print("bench skipped: the model was streamed (--offload layer); time it with `adapt-engine bench --compare "
              f"{out}` where both models fit in memory")
    elif bench:
        dense_model, _ = load_model(dense.model, device=dense.device, dtype=dense.dtype)
        print(format_quick_speedup(quick_speedup(dense_model, model)))
    return out
