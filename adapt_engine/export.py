"""`adapt-engine export`: write a (pruned) model for a serving engine — vLLM (DeciLM folder) or llama.cpp (GGUF).

Both keep every layer's own KV heads and MLP width. vLLM needs one query-head count for all layers, so
layers with fewer get zero heads (exact; the FLOPs they cost are reported). ``export_report.json`` in the
output folder records the per-layer shapes, the padding and its cost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .args import EXPORT_DTYPES, FORMATS, ExportSettings
from .errors import UsageError
from .export_deci import write_deci
from .export_gguf import write_gguf
from .export_layout import check_exportable, padded_head_count, padding_cost, serving_layers
from .flops import forward_flops_per_token, model_shape
from .fsio import atomic_dir, atomic_write_json
from .models import load_model, parse_dtype
from .options import check_output

REPORT_NAME = "export_report.json"
PADDING_CONTEXT = 512  # context length at which the attention part of the padding cost is quoted


def export_model(model, tokenizer, fmt: str, output: str | Path, dtype: str = "float32",
                 overwrite: bool = False, name: str = "adapt-engine export") -> dict:
    """Write ``model`` for serving engine ``fmt`` into ``output``; returns the export report."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got '{dtype}'")
    adapter = check_exportable(model, fmt)
    if fmt == "gguf" and tokenizer is None:
        raise UsageError("GGUF export needs the model's tokenizer (llama.cpp will not load a GGUF without one); "
                         "pass a model folder that has its tokenizer files")
    torch_dtype = parse_dtype(dtype)
    layers = serving_layers(adapter)
    report: dict = {"format": fmt, "dtype": dtype, "layers": [s.__dict__ for s in layers]}
    if fmt == "vllm":
        padded = padded_head_count(layers)
        report["num_attention_heads"] = padded
        report["padding"] = padding_cost(layers, padded, adapter.hidden_size, adapter.head_dim, PADDING_CONTEXT,
                                         forward_flops_per_token(model_shape(model), PADDING_CONTEXT))
    t0 = time.perf_counter()
    with atomic_dir(output, overwrite=overwrite, marker=f"export-{fmt}") as tmp:
        if fmt == "vllm":
            write_deci(adapter, tokenizer, tmp, torch_dtype, dtype)
        else:
            report.update(write_gguf(adapter, tokenizer, tmp, torch_dtype, name))
        report["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(tmp / REPORT_NAME, report, indent=2)
    return report


def format_export(report: dict, output: str) -> str:
    """Human-readable summary of an export report."""
    layers = report["layers"]
    lines = [f"exported {len(layers)} layers to {output} ({report['format']}, {report['dtype']}, "
             f"{report['seconds']} s)",
             "  query heads: " + " ".join(str(s["heads"]) for s in layers),
             "  KV heads:    " + " ".join(str(s["kv_heads"]) for s in layers),
             "  MLP widths:  " + " ".join(str(s["intermediate"]) for s in layers)]
    pad = report.get("padding")
    if pad:
        if pad["padded_query_heads"]:
            lines.append(
                f"  vLLM needs {report['num_attention_heads']} query heads in every layer: "
                f"{pad['padded_query_heads']} zero heads added (exact), costing "
                f"{pad['projection_flops_per_token'] + pad['attention_flops_per_token']:,} FLOPs/token at "
                f"context {pad['context_len']} = {100 * pad['overhead']:.1f} % of the model's "
                f"{pad['model_flops_per_token']:,}")
        else:
            lines.append(f"  no query-head padding needed ({report['num_attention_heads']} heads in every layer)")
    for warning in report.get("warnings", []):
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def run_export(args: ExportSettings) -> int:
    """`adapt-engine export`: check, load, write, print the summary."""
    args.validate()
    check_output(args.output, overwrite=args.overwrite, model=args.model, dtype=args.dtype)
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    report = export_model(model, tokenizer, args.format, args.output, args.dtype, args.overwrite,
                          name=Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    print(format_export(report, args.output))
    print(json.dumps({"output": str(args.output), "format": args.format}))
    return 0
