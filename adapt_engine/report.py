"""Human-readable before/after report and the per-layer widths / importance chart."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _fmt(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n >= 1e6 else f"{n:,}"


def format_report(report: dict) -> str:
    """A plain-text summary of a pruning run (what `adapt-engine prune` prints)."""
    before, after = report["params_before"], report["params_after"]
    pb, pa = report["prunable_before"], report["prunable_after"]
    lines = [
        "",
        "adapt-engine prune report",
        "=" * 64,
        f"model          {report['model']}",
        "settings       " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()),
        f"parameters     {_fmt(before)} -> {_fmt(after)}  ({100 * (1 - after / before):.2f}% fewer)",
        f"prunable       {_fmt(pb)} -> {_fmt(pa)}  (sparsity {100 * (1 - pa / pb):.2f}%, "
        f"target {_fmt(report['target_params'])} total, off by {after - report['target_params']:+,})",
        f"wall time      {report['wall_seconds']:.1f} s  (peak RSS {report.get('peak_rss_mb', 0):,.0f} MB)",
    ]
    if report.get("round_to", 1) > 1:
        lines.append(f"round-to       {report['round_to']} (cost vs. exact target: "
                     f"{report.get('rounding_cost_params', 0):+,} params)")
    if "ppl_before" in report:
        lines.append(f"perplexity     {report['ppl_before']:.3f} -> {report['ppl_after']:.3f} "
                     f"(held-out, {report['ppl_tokens']:,} tokens)")
    lines += ["", f"{'layer':>5} {'heads':>9} {'kv':>6} {'mlp':>11} {'sparsity':>9} {'importance':>11}"]
    orig = report["widths_before"]
    imp = report["history"][-1]["layer_importance"] if report["history"] else [0.0] * len(orig)
    for j, (o, n) in enumerate(zip(orig, report["widths_after"])):
        lp_b = report["layer_params_before"][j]
        lp_a = report["layer_params_after"][j]
        lines.append(
            f"{j:>5} {o['num_heads']:>3}->{n['num_heads']:<3} {o['num_kv_heads']:>2}->{n['num_kv_heads']:<2} "
            f"{o['intermediate_size']:>5}->{n['intermediate_size']:<5} {100 * (1 - lp_a / lp_b):>8.1f}% "
            f"{imp[j]:>+11.3f}"
        )
    return "\n".join(lines)


def plot_report(report: dict, path: str | Path) -> Path:
    """PNG with per-layer widths (before/after) and layer importance across sub-steps; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(report["widths_after"])
    layers = list(range(n))
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for key, ax, label in (("intermediate_size", axes[0], "MLP channels"), ("num_heads", axes[1], "query heads")):
        ax.bar(layers, [w[key] for w in report["widths_before"]], color="#ccc", label="before")
        ax.bar(layers, [w[key] for w in report["widths_after"]], color="#3a7", label="after")
        ax.set_ylabel(label)
        ax.legend(loc="lower right")
    hist = report["history"]
    cmap = plt.get_cmap("viridis")
    for i, rec in enumerate(hist):
        axes[2].plot(layers, rec["layer_importance"], color=cmap(i / max(1, len(hist) - 1)), lw=1,
                     label=f"step {i + 1}" if i in (0, len(hist) - 1) else None)
    axes[2].set_ylabel("normalised layer importance")
    axes[2].set_xlabel("decoder layer")
    axes[2].axhline(0, color="k", lw=0.5)
    if hist:
        axes[2].legend(loc="best")
    fig.suptitle(f"{report['model']}: {report['params_before']:,} -> {report['params_after']:,} params")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
