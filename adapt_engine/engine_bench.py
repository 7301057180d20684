"""`adapt-engine bench --engine vllm|llama.cpp`: dense and pruned models timed in the engine that will serve them.

Every model is exported on the fly (DeciLM for vLLM, GGUF for llama.cpp; a ``--compare`` folder that already is
an export of that format is used as it is) and all are loaded in one engine process, then timed in interleaved
rounds so that drifting machine load hits every model alike. Reported per model, as medians over the rounds:
time to first token (one request, prefill), time per output token, tokens/s — for vLLM at each
``--concurrency`` level (requests submitted together) — and each figure's ratio to the dense model.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from .export import REPORT_NAME, export_model
from .fsio import atomic_write, atomic_write_json
from .models import load_model
from .serving import run_engine

FORMAT_OF = {"vllm": "vllm", "llama.cpp": "gguf"}
JSON_NAME = "bench_engine.json"
CHART_NAME = "bench_engine.png"


def _served_path(spec: str | None, engine: str, scratch: Path, name: str) -> str:
    """A path the engine can load: an existing export of the right format, or a fresh float32 export."""
    fmt = FORMAT_OF[engine]
    if spec is not None and (Path(spec) / REPORT_NAME).is_file():
        report = json.loads((Path(spec) / REPORT_NAME).read_text())
        if report.get("format") == fmt:
            return str(Path(spec) / "model.gguf") if fmt == "gguf" else spec
    model, tokenizer = load_model(spec)
    out = scratch / name
    export_model(model, tokenizer, fmt, out)
    return str(out / "model.gguf") if fmt == "gguf" else str(out)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(engine: str, names: list[str], raw: list[dict], new_tokens: int) -> dict:
    """Medians per model and their ratios to the first (dense) model."""
    rows = {}
    for name, rec in zip(names, raw):
        row = {"ttft_s": _median(rec["ttft_s"])}
        if engine == "vllm":
            levels = {n: _median([r["tokens"] / r["wall_s"] for r in runs]) for n, runs in rec["levels"].items()}
            single = _median([r["wall_s"] for r in rec["levels"].get("1", [])])
            row["tokens_per_s"] = levels
            if "1" in rec["levels"]:
                row["tpot_s"] = (single - row["ttft_s"]) / max(new_tokens - 1, 1)
        else:
            row["tpot_s"] = _median(rec["token_s"])
            row["tokens_per_s"] = {"1": 1.0 / row["tpot_s"]}
        rows[name] = row
    dense = rows[names[0]]
    for row in rows.values():
        row["ttft_speedup"] = dense["ttft_s"] / row["ttft_s"]
        if "tpot_s" in row and "tpot_s" in dense:
            row["tpot_speedup"] = dense["tpot_s"] / row["tpot_s"]
        row["throughput_ratio"] = {n: v / dense["tokens_per_s"][n] for n, v in row["tokens_per_s"].items()}
    return rows


def format_rows(engine: str, rows: dict) -> str:
    """A text table of the summary."""
    levels = list(next(iter(rows.values()))["tokens_per_s"])
    head = ["model", "TTFT ms", "x dense", "TPOT ms", "x dense"] + [f"tok/s @{n}" for n in levels] + ["x dense"]
    lines = ["  ".join(head)]
    for name, r in rows.items():
        cells = [name, f"{1e3 * r['ttft_s']:.1f}", f"{r['ttft_speedup']:.2f}",
                 f"{1e3 * r.get('tpot_s', float('nan')):.2f}", f"{r.get('tpot_speedup', float('nan')):.2f}"]
        cells += [f"{r['tokens_per_s'][n]:.1f}" for n in levels]
        cells.append(" / ".join(f"{r['throughput_ratio'][n]:.2f}" for n in levels))
        lines.append("  ".join(cells))
    return f"engine: {engine} (speed-ups: dense time / model time; throughput: model / dense)\n" + "\n".join(lines)


def _chart(rows: dict, engine: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    levels = list(rows[names[0]]["tokens_per_s"])
    series = {"TTFT": [rows[n]["ttft_speedup"] for n in names], "TPOT": [rows[n].get("tpot_speedup", 0) for n in names]}
    series.update({f"tok/s @{lv}": [rows[n]["throughput_ratio"][lv] for n in names] for lv in levels})
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(series) * len(names) / 2), 3.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(series))], [v[i] for v in series.values()], width, label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(series))], list(series))
    ax.set_ylabel("speed vs dense (x)")
    ax.set_title(f"{engine}: speed relative to dense")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def run_engine_bench(args, out: Path) -> int:
    """Export dense and pruned models, time them in ``args.engine``, print the table, write JSON and PNG into
    ``out`` (checked by the caller, as for every `bench`)."""
    concurrency = list(args.concurrency)
    prompt_len, new_tokens = args.prompt_lens[0], args.new_tokens
    names = ["dense"] + [Path(c.rstrip("/")).name for c in args.compare]
    with tempfile.TemporaryDirectory(prefix="adapt-engine-bench-") as scratch:
        paths = [_served_path(spec, args.engine, Path(scratch), f"m{i}")
                 for i, spec in enumerate([args.model, *args.compare])]
        # llama.cpp's threads spin while they wait for each other: on a busy machine, fewer is faster.
        request = {"bench": {"paths": paths, "prompt_len": prompt_len, "max_tokens": new_tokens,
                             "concurrency": concurrency, "repeats": args.repeats}, "threads": args.threads or 1}
        raw = run_engine(args.engine, request)
    rows = summarize(args.engine, names, raw, new_tokens)
    print(format_rows(args.engine, rows))
    result = {"engine": args.engine, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": args.repeats,
              "concurrency": concurrency if args.engine == "vllm" else [1],
              "models": dict(zip(names, [args.model or "default (SmolLM2-135M-Instruct)", *args.compare])),
              "summary": rows, "raw": dict(zip(names, raw))}
    atomic_write_json(out / JSON_NAME, result, indent=2)
    _chart(rows, args.engine, out / CHART_NAME)
    print(f"\nwrote {out / JSON_NAME} and {out / CHART_NAME}")
    return 0
