"""Latency benchmark of a dense model against pruned versions of it (``adapt-engine bench``).

Method, chosen so that the reported speedups mean something on a noisy shared machine:

- Every model runs greedy ``generate`` with the KV cache for exactly ``new_tokens`` tokens
  (``min_new_tokens = max_new_tokens``, so EOS never ends a run early). A logits processor stamps the
  clock once per step: prefill latency is the time from the call to the first stamp (time to first
  token), decode latency per token is the mean gap between the following stamps.
- Warm-up runs first, then ``repeats`` rounds; within a round every model runs once, in an order
  rotated each round (round-robin), so machine noise hits dense and pruned alike. Speedups are medians
  of the per-round ratios; every latency is reported as median with p20/p80.
- CPU: ``time.perf_counter``; CUDA: events, read after a synchronize.
- The ideal speedup is the analytic FLOP ratio (:mod:`adapt_engine.flops`) of the same work.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import base_model_type
from .args import (
    ATTENTION_CHOICES,
    CHART_NAME,
    DEFAULT_BATCH_SIZES,
    DEFAULT_MODEL_NAME,
    DEFAULT_NEW_TOKENS,
    DEFAULT_PROMPT_LENS,
    DEFAULT_REPEATS,
    DEFAULT_WARMUP,
    JSON_NAME,
    BenchSettings,
    check_sizes,
)
from .devices import resolve_device
from .engine_bench import run_engine_bench
from .errors import AdaptEngineError, BenchInputError, OutputPathError
from .flops import (
    ModelShape,
    UnsupportedShapeError,
    decode_flops,
    forward_flops_per_token,
    kv_cache_bytes,
    model_shape,
    prefill_flops,
)
from .fsio import atomic_write, atomic_write_json, preflight_output
from .models import load_model, parse_dtype
from .settings import add_flags, from_args

# Strings whose token ids must agree between two tokenizers for them to count as the same tokenizer.
TOKENIZER_PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # 1234567890",
    "Größe, naïve café, 東京, emoji 🙂 and   spaces.",
)
# Safety factor on the working-memory estimate: allocator slack, the copy made when the cache grows.
MEMORY_MARGIN = 1.25


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention implementation to benchmark: sdpa, or flash_attention_2 when it can run here."""
    if requested not in ATTENTION_CHOICES:
        raise BenchInputError(f"--attn must be one of {', '.join(ATTENTION_CHOICES)}, got '{requested}'")
    flash_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_attn_installed()
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise BenchInputError(
            "--attn flash_attention_2 needs a CUDA device, --dtype float16/bfloat16 and the flash-attn "
            "package (pip install 'adapt-engine[gpu]'); use --attn sdpa (or auto) here"
        )
    return requested


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (MemAvailable on CPU, free memory on CUDA)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _attention_of(model: nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "unknown")


def _set_attention(model: nn.Module, implementation: str, fallback: str | None = None) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        model.config._attn_implementation = implementation
        return
    try:
        setter(implementation)
    except (ValueError, ImportError) as err:
        # Some families have no SDPA path (Gemma 2's logit soft-capping): --attn auto falls back.
        if fallback is None:
            reason = str(err).split(". ")[0]
            raise BenchInputError(
                f"{type(model).__name__} cannot run --attn {implementation} ({reason}); choose another --attn, "
                "e.g. eager, or leave the default auto"
            ) from err
        setter(fallback)


def environment(device: torch.device, dtype: torch.dtype, attention: str) -> dict:
    """What the numbers were measured on; printed with the table and stored in the JSON."""
    import transformers

    env = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "attention": attention,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            match = re.search(r"^model name\s*:\s*(.+)$", fh.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------


def _family(model: nn.Module) -> str:
    return base_model_type(model.config) or type(model).__name__


def _head_dim(shape: ModelShape) -> int | None:
    layer = shape.layers[0]
    return layer.score_width // layer.num_heads if layer.num_heads else None


def check_pruned_version(dense: nn.Module, pruned: nn.Module, name: str = "pruned") -> None:
    """Raise :class:`BenchInputError` unless ``pruned`` is a width-pruned copy of ``dense``."""
    dense_shape, pruned_shape = _shape_or_error(dense, "dense"), _shape_or_error(pruned, name)
    fix = "pass to --compare a model pruned from the --model one (or pass the --model it was pruned from)"
    if _family(dense) != _family(pruned):
        raise BenchInputError(
            f"'{name}' is a {_family(pruned)} model but the dense model is {_family(dense)}; {fix}"
        )
    if pruned_shape.hidden_size > dense_shape.hidden_size:  # stem pruning (docs/stem.md) may only narrow it
        raise BenchInputError(f"'{name}' has hidden size {pruned_shape.hidden_size}, wider than the dense model's "
                              f"{dense_shape.hidden_size}, so it is not a pruned version of it; {fix}")
    for what, a, b in (
        ("vocabulary size", dense_shape.vocab_size, pruned_shape.vocab_size),
        ("number of decoder layers", len(dense_shape.layers), len(pruned_shape.layers)),
        ("attention head size", _head_dim(dense_shape), _head_dim(pruned_shape)),
    ):
        if a != b:
            raise BenchInputError(
                f"'{name}' has {what} {b} but the dense model has {a}, so it is not a pruned version of it "
                f"(pruning keeps this fixed); {fix}"
            )
    for dense_layer, pruned_layer in zip(dense_shape.layers, pruned_shape.layers, strict=True):
        if set(dense_layer.linears) != set(pruned_layer.linears):
            raise BenchInputError(
                f"layer {dense_layer.index} of '{name}' has projections {sorted(pruned_layer.linears)} but "
                f"the dense model has {sorted(dense_layer.linears)}; {fix}"
            )
        for proj, (fan_in, fan_out) in pruned_layer.linears.items():
            dense_in, dense_out = dense_layer.linears[proj]
            if fan_in > dense_in or fan_out > dense_out:
                raise BenchInputError(
                    f"layer {dense_layer.index} {proj} of '{name}' is {fan_in}x{fan_out}, wider than the "
                    f"dense {dense_in}x{dense_out}: it is not a pruned version of the dense model; {fix}"
                )


def check_same_tokenizer(reference, other, name: str = "pruned") -> None:
    """Raise :class:`BenchInputError` unless two tokenizers have the same vocabulary and ids."""
    if len(reference) != len(other):
        raise BenchInputError(
            f"the tokenizer of '{name}' has {len(other)} tokens but the dense model's has {len(reference)}; "
            "benchmark models that share one tokenizer (save the pruned model with its tokenizer)"
        )
    for probe in TOKENIZER_PROBES:
        a, b = reference.encode(probe), other.encode(probe)
        if list(a) != list(b):
            raise BenchInputError(
                f"the tokenizer of '{name}' encodes {probe!r} as {list(b)[:8]}... but the dense model's "
                f"gives {list(a)[:8]}...; benchmark models that share one tokenizer"
            )


def _shape_or_error(model: nn.Module, name: str) -> ModelShape:
    try:
        return model_shape(model)
    except UnsupportedShapeError as err:
        raise BenchInputError(f"model '{name}': {err}") from err


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one generate run needs on top of the (already loaded) weights."""

    kv_cache: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        """All of it, with the safety margin applied."""
        return int(MEMORY_MARGIN * (self.kv_cache + self.activations + self.logits))


def estimate_memory(shape: ModelShape, batch_size: int, prompt_len: int, new_tokens: int,
                    bytes_per_value: int, attention: str) -> MemoryEstimate:
    """Working memory of a generate run: KV cache, the largest prefill activations and the logits."""
    kv = kv_cache_bytes(shape, batch_size, prompt_len + new_tokens, bytes_per_value)
    widest = max((layer.max_width for layer in shape.layers), default=0)
    # A layer keeps its input, the normed copy, the residual sum and a projection output alive, and the
    # MLP has gate, up and their product at the widest width at once.
    act = batch_size * prompt_len * bytes_per_value * (4 * shape.hidden_size + 3 * widest)
    if attention == "eager":  # only eager materialises the full score matrix (in float32 for the softmax)
        heads = max((layer.num_heads or layer.score_width for layer in shape.layers), default=0)
        act += batch_size * heads * prompt_len * prompt_len * 4
    logits = 3 * batch_size * shape.vocab_size * 4  # last-position logits, their float32 copy, the scores
    return MemoryEstimate(kv, act, logits)


def check_memory(shapes: Mapping[str, ModelShape], settings: Sequence[tuple[int, int]], new_tokens: int,
                 device: torch.device, bytes_per_value: int, attention: str) -> None:
    """Raise :class:`BenchInputError` if the largest setting will not fit in the free memory."""
    available = available_memory(device)
    if available is None:
        return
    for batch, prompt in settings:
        for name, shape in shapes.items():
            need = estimate_memory(shape, batch, prompt, new_tokens, bytes_per_value, attention)
            if need.total > available:
                gib = 1024 ** 3
                raise BenchInputError(
                    f"batch {batch} x prompt {prompt} + {new_tokens} new tokens on '{name}' needs about "
                    f"{need.total / gib:.1f} GiB on {device} (KV cache {need.kv_cache / gib:.1f} GiB, "
                    f"activations {need.activations / gib:.1f} GiB, logits {need.logits / gib:.2f} GiB) but "
                    f"only {available / gib:.1f} GiB is free; lower --batch-sizes, --prompt-lens or "
                    "--new-tokens, use a smaller --dtype, or free memory"
                )


def _check_positions(model: nn.Module, name: str, prompt_len: int, new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_len + new_tokens > limit:
        raise BenchInputError(
            f"prompt {prompt_len} + {new_tokens} new tokens exceeds the {limit} positions of '{name}'; "
            "lower --prompt-lens or --new-tokens"
        )


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


class _Clock:
    """perf_counter on CPU; CUDA events (read after a synchronize) on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1e3


class _StepMarks:
    """Logits processor that only stamps the clock: it runs once per generated token, after the forward."""

    def __init__(self, clock: _Clock):
        self.clock = clock
        self.marks: list = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(self.clock.mark())
        return scores


class _PeakMemory:
    """Peak working memory of one run: allocator peak on CUDA, peak RSS growth on Linux CPUs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()  # hand cached free memory back, so the run has to grow RSS to get it
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        except OSError:
            self.base = -1
            return
        self.base = _proc_status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        if self.base < 0:
            return None
        return max(_proc_status_kib("VmHWM") * 1024 - self.base, 0)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _generation_config(new_tokens: int, tokenizer, model: nn.Module):
    from transformers import GenerationConfig

    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = eos if isinstance(eos, int) else 0
    # min_new_tokens = max_new_tokens: EOS is suppressed, so every run decodes the same number of tokens.
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            num_beams=1, use_cache=True, pad_token_id=pad, eos_token_id=eos)


def _timed_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen_config,
                    clock: _Clock) -> tuple[float, float]:
    """(prefill ms, decode ms per token) of one greedy generate run."""
    from transformers import LogitsProcessorList

    marks = _StepMarks(clock)
    gc.collect()
    gc.disable()  # a collection inside a timed run would land on whichever model happened to be running
    try:
        clock.sync()
        start = clock.mark()
        model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config,
                       logits_processor=LogitsProcessorList([marks]))
        clock.sync()
    finally:
        gc.enable()
    steps = len(marks.marks)
    if steps != gen_config.max_new_tokens:
        raise RuntimeError(f"generate produced {steps} tokens instead of {gen_config.max_new_tokens}")
    prefill = clock.ms(start, marks.marks[0])
    decode = clock.ms(marks.marks[0], marks.marks[-1]) / (steps - 1)
    return prefill, decode


def time_generate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int,
                  tokenizer=None) -> tuple[float, float]:
    """(prefill ms, decode ms per token) of one greedy fixed-length generate run on ``input_ids``."""
    check_sizes([input_ids.shape[0]], [input_ids.shape[1]], new_tokens, 1, 0)
    with torch.inference_mode():
        return _timed_generate(model, input_ids, torch.ones_like(input_ids),
                               _generation_config(new_tokens, tokenizer, model), _Clock(input_ids.device))


def _stats(samples: Sequence[float]) -> dict:
    values = np.asarray(samples, dtype=float)
    return {
        "median": float(np.median(values)),
        "p20": float(np.percentile(values, 20)),
        "p80": float(np.percentile(values, 80)),
        "min": float(values.min()),
        "samples": [float(v) for v in values],
    }


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """Everything one benchmark measured; renders as a table, JSON and a speedup chart."""

    baseline: str
    environment: dict
    config: dict
    models: dict = field(default_factory=dict)
    settings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return {"baseline": self.baseline, "environment": self.environment, "config": self.config,
                "models": self.models, "settings": self.settings}

    def speedup(self, name: str, batch_size: int, prompt_len: int) -> dict:
        """Speedup entry of model ``name`` over the baseline for one (batch, prompt) setting."""
        for setting in self.settings:
            if setting["batch_size"] == batch_size and setting["prompt_len"] == prompt_len:
                return setting["speedups"][name]
        raise KeyError(f"no setting batch {batch_size} x prompt {prompt_len}")

    def format_table(self) -> str:
        """The terminal table: latencies with p20-p80, peak memory, measured vs ideal speedups."""
        env, cfg = self.environment, self.config
        lines = [
            f"adapt-engine bench: {env['device']} (torch threads={env['torch_threads']}, {env['cpu']}), "
            f"{env['dtype']}, attention {env['attention']}, torch {env['torch']}, "
            f"transformers {env['transformers']}",
            f"greedy generate of {cfg['new_tokens']} tokens with KV cache; {cfg['warmup']} warm-up + "
            f"{cfg['repeats']} interleaved repeats; median [p20-p80]; speedup vs '{self.baseline}' "
            "(ideal = FLOP ratio, % = measured/ideal)",
            "",
        ]
        header = ["model", "params", "GFLOP/tok", "batch", "prompt", "prefill ms", "decode ms/tok",
                  "peak MiB", "prefill speedup", "decode speedup"]
        rows = []
        for setting in self.settings:
            for name, m in setting["models"].items():
                row = [name, f"{self.models[name]['params'] / 1e6:.1f}M",
                       f"{self.models[name]['linear_gflops_per_token']:.3g}",
                       str(setting["batch_size"]), str(setting["prompt_len"]),
                       _fmt_stats(m["prefill_ms"]), _fmt_stats(m["decode_ms_per_token"]),
                       "-" if m["peak_memory_bytes"] is None else f"{m['peak_memory_bytes'] / 2 ** 20:.0f}"]
                if name == self.baseline:
                    row += ["-", "-"]
                else:
                    s = setting["speedups"][name]
                    row += [_fmt_speedup(s["prefill"]["median"], s["ideal_prefill"]),
                            _fmt_speedup(s["decode"]["median"], s["ideal_decode"])]
                rows.append(row)
        lines += _align([header, *rows])
        peak = "allocator peak" if env["device"].startswith("cuda") else "peak RSS growth"
        lines += ["", "GFLOP/tok: weight matmuls per token incl. LM head; decode ms/tok: one step, which "
                  f"yields one token per sequence; peak MiB: weights + working memory ({peak})"]
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON, atomically (temp file in the same folder, then rename)."""
        return atomic_write_json(path, self.to_dict())

    def write_chart(self, path: str | os.PathLike) -> Path:
        """PNG bar chart of measured speedup against the ideal FLOP ratio, per setting (atomic write)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        others = [name for name in self.models if name != self.baseline]
        labels = [f"b{s['batch_size']} x {s['prompt_len']}" for s in self.settings]
        fig = Figure(figsize=(max(6.0, 1.6 * len(labels) * max(len(others), 1) + 2), 7.5))
        FigureCanvasAgg(fig)
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
        width = 0.8 / max(len(others), 1)
        for row, phase in enumerate(("prefill", "decode")):
            ax = fig.add_subplot(2, 1, row + 1)
            for k, name in enumerate(others):
                xs = [i - 0.4 + width * (k + 0.5) for i in range(len(labels))]
                stats = [s["speedups"][name][phase] for s in self.settings]
                measured = [st["median"] for st in stats]
                low = [st["median"] - st["p20"] for st in stats]
                high = [st["p80"] - st["median"] for st in stats]
                ideal = [s["speedups"][name][f"ideal_{phase}"] for s in self.settings]
                color = colors[k % len(colors)]
                ax.bar(xs, ideal, width * 0.9, fill=False, edgecolor=color, hatch="//", linewidth=1.0,
                       label=f"{name} ideal (FLOP ratio)")
                ax.bar(xs, measured, width * 0.6, color=color, yerr=[low, high], capsize=3,
                       label=f"{name} measured (p20-p80)")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels)
            ax.set_ylabel(f"{phase} speedup (x)")
            ax.set_title(f"{phase}: speedup over '{self.baseline}'")
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        env = self.environment
        fig.suptitle(f"{env['device']} (torch threads={env['torch_threads']}), {env['dtype']}, attention "
                     f"{env['attention']}, {self.config['new_tokens']} new tokens")
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _fmt_stats(stats: dict) -> str:
    return f"{stats['median']:.2f} [{stats['p20']:.2f}-{stats['p80']:.2f}]"


def _fmt_speedup(measured: float, ideal: float) -> str:
    return f"{measured:.2f}x ({ideal:.2f}x, {100 * measured / ideal:.0f}%)"


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in pairs]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


# ----------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------


def benchmark_models(
    models: Mapping[str, nn.Module],
    tokenizer=None,
    *,
    baseline: str | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    prompt_lens: Sequence[int] = DEFAULT_PROMPT_LENS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    attention: str | None = None,
    attention_fallback: str | None = None,
    measure_memory: bool = True,
    check_inputs: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Benchmark models (the first, or ``baseline``, is the dense reference) interleaved, in one process.

    ``attention`` switches every model to that attention implementation (None keeps theirs); a model
    that cannot use it gets ``attention_fallback`` instead, or a :class:`BenchInputError` without one. With
    ``check_inputs`` every other model must be a pruned version of the baseline and every setting must
    fit in memory, else :class:`BenchInputError`.
    """
    if not models:
        raise BenchInputError("no models to benchmark; pass the dense model and at least one pruned model")
    names = list(models)
    baseline = baseline if baseline is not None else names[0]
    if baseline not in models:
        raise BenchInputError(f"baseline '{baseline}' is not one of the models {names}")
    check_sizes(batch_sizes, prompt_lens, new_tokens, repeats, warmup)
    devices = {_model_device(m) for m in models.values()}
    dtypes = {_model_dtype(m) for m in models.values()}
    if len(devices) != 1 or len(dtypes) != 1:
        raise BenchInputError(
            f"models are on devices {sorted(map(str, devices))} with dtypes {sorted(map(str, dtypes))}; load "
            "every model on the same --device with the same --dtype"
        )
    device, dtype = devices.pop(), dtypes.pop()
    shapes = {name: _shape_or_error(m, name) for name, m in models.items()}
    if check_inputs:
        _check_models(models, tokenizer, shapes, baseline, prompt_lens, new_tokens)
    if attention is not None:
        for model in models.values():
            _set_attention(model, attention, attention_fallback)
    attentions = {_attention_of(m) for m in models.values()}
    attention_name = attentions.pop() if len(attentions) == 1 else "mixed: " + ", ".join(sorted(attentions))
    bytes_per_value = torch.finfo(dtype).bits // 8
    settings = [(b, p) for b in batch_sizes for p in prompt_lens]
    if check_inputs:
        check_memory(shapes, settings, new_tokens, device, bytes_per_value, attention_name)

    result = BenchResult(
        baseline=baseline,
        environment=environment(device, dtype, attention_name),
        config={"batch_sizes": list(batch_sizes), "prompt_lens": list(prompt_lens), "new_tokens": new_tokens,
                "repeats": repeats, "warmup": warmup, "seed": seed,
                "prefill": "time from the generate call to the first token (LM head on the last position)",
                "decode": "mean time per token over the following new_tokens - 1 cached steps"},
    )
    for name, model in models.items():
        result.models[name] = _model_summary(model, shapes[name])

    clock = _Clock(device)
    if measure_memory:
        for model in models.values():
            _touch_weights(model)
    was_training = {name: m.training for name, m in models.items()}
    for model in models.values():
        model.eval()
    try:
        with torch.inference_mode():
            for batch, prompt in settings:
                result.settings.append(_bench_setting(
                    models, shapes, baseline, tokenizer, clock, batch, prompt, new_tokens, repeats, warmup,
                    measure_memory, seed, progress))
    finally:
        for name, model in models.items():
            model.train(was_training[name])
    return result


def _check_models(models: Mapping[str, nn.Module], tokenizer, shapes: Mapping[str, ModelShape], baseline: str,
                  prompt_lens: Sequence[int], new_tokens: int) -> None:
    """Every model is a pruned version of the baseline, fits the prompt positions, and suits the tokenizer."""
    for name, model in models.items():
        if name != baseline:
            check_pruned_version(models[baseline], model, name)
        for prompt in prompt_lens:
            _check_positions(model, name, prompt, new_tokens)
    if tokenizer is not None and len(tokenizer) > shapes[baseline].vocab_size:
        raise BenchInputError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{shapes[baseline].vocab_size}; pass the tokenizer that belongs to the model"
        )


def _model_summary(model: nn.Module, shape: ModelShape) -> dict:
    """Size, weight bytes, FLOPs per token and per-layer linear shapes of one benchmarked model."""
    return {
        "params": shape.params,
        "embedding_params": shape.embedding_params,
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "linear_gflops_per_token": shape.linear_flops_per_token / 1e9,
        "lm_head_gflops_per_token": shape.head_flops_per_token / 1e9,
        "layers": [{"linears": {k: list(v) for k, v in layer.linears.items()},
                    "query_heads": layer.num_heads} for layer in shape.layers],
    }


def _touch_weights(model: nn.Module) -> None:
    # Weights loaded from safetensors may be memory-mapped and only become resident when first read; that
    # page-in must not be counted as the first run's working memory.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.numel():
                tensor.detach().reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()


def _bench_setting(models, shapes, baseline, tokenizer, clock, batch, prompt, new_tokens, repeats, warmup,
                   measure_memory, seed, progress) -> dict:
    names = list(models)
    device = clock.device
    vocab = min(shape.vocab_size for shape in shapes.values())
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch * 10_007 + prompt)
    # Token content does not change the work done; every model sees the same ids.
    input_ids = torch.randint(0, vocab, (batch, prompt), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    gen_configs = {name: _generation_config(new_tokens, tokenizer, models[name]) for name in names}
    peaks: dict[str, int | None] = {name: None for name in names}
    tag = f"batch {batch} x prompt {prompt}"

    for w in range(warmup):
        for name in names:
            if progress:
                progress(f"[{tag}] warm-up {w + 1}/{warmup}: {name}")
            tracker = _PeakMemory(device) if measure_memory and w == warmup - 1 else None
            if tracker:
                tracker.start()
            _timed_generate(models[name], input_ids, attention_mask, gen_configs[name], clock)
            if tracker:
                peaks[name] = tracker.stop()

    prefill: dict[str, list[float]] = {name: [] for name in names}
    decode: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first each round
        for name in order:
            p, d = _timed_generate(models[name], input_ids, attention_mask, gen_configs[name], clock)
            prefill[name].append(p)
            decode[name].append(d)
            if progress:
                progress(f"[{tag}] repeat {r + 1}/{repeats}: {name} prefill {p:.1f} ms, decode {d:.2f} ms/token")

    entry = {"batch_size": batch, "prompt_len": prompt, "new_tokens": new_tokens,
             "models": {}, "speedups": {}}
    ideal = {}
    for name in names:
        shape, model = shapes[name], models[name]
        p_flops = prefill_flops(shape, batch, prompt)
        d_flops = decode_flops(shape, batch, prompt, new_tokens)
        p_med, d_med = _stats(prefill[name])["median"], _stats(decode[name])["median"]
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        bytes_per_value = next(model.parameters()).element_size()
        ideal[name] = (p_flops, d_flops)
        entry["models"][name] = {
            "prefill_ms": _stats(prefill[name]),
            "decode_ms_per_token": _stats(decode[name]),
            "prefill_tokens_per_s": batch * prompt / p_med * 1e3,
            "decode_tokens_per_s": batch / d_med * 1e3,
            "prefill_flops": p_flops,
            "decode_flops_per_token": d_flops / (batch * (new_tokens - 1)),
            "forward_flops_per_token_at_prompt": forward_flops_per_token(shape, prompt),
            "prefill_gflops_per_s": p_flops / p_med / 1e6,
            "kv_cache_bytes": kv_cache_bytes(shape, batch, prompt + new_tokens, bytes_per_value),
            "working_memory_bytes": peaks[name],
            "peak_memory_bytes": None if peaks[name] is None else weights + peaks[name],
        }
    for name in names:
        if name == baseline:
            continue
        prefill_ratio = [b / m for b, m in zip(prefill[baseline], prefill[name], strict=True)]
        decode_ratio = [b / m for b, m in zip(decode[baseline], decode[name], strict=True)]
        ideal_prefill = ideal[baseline][0] / ideal[name][0]
        ideal_decode = ideal[baseline][1] / ideal[name][1]
        p_stats, d_stats = _stats(prefill_ratio), _stats(decode_ratio)
        entry["speedups"][name] = {
            "prefill": p_stats,
            "decode": d_stats,
            # Best run against best run: on a loaded machine the least disturbed runs are the closest to
            # the models' own speed; reported beside the median, never instead of it.
            "prefill_best": min(prefill[baseline]) / min(prefill[name]),
            "decode_best": min(decode[baseline]) / min(decode[name]),
            "ideal_prefill": ideal_prefill,
            "ideal_decode": ideal_decode,
            "prefill_efficiency": p_stats["median"] / ideal_prefill,
            "decode_efficiency": d_stats["median"] / ideal_decode,
        }
    return entry


# ----------------------------------------------------------------------------------------------------
# Short benchmark for the end of prune / accel
# ----------------------------------------------------------------------------------------------------


def quick_speedup(dense_model: nn.Module, pruned_model: nn.Module, *, batch_size: int = 1,
                  prompt_len: int = 128, new_tokens: int = 16, repeats: int = 3) -> dict:
    """Short interleaved bench of a pruned model against its dense original: measured and ideal speedups."""
    result = benchmark_models({"dense": dense_model, "pruned": pruned_model}, baseline="dense",
                              batch_sizes=(batch_size,), prompt_lens=(prompt_len,), new_tokens=new_tokens,
                              repeats=repeats, warmup=1, measure_memory=False)
    setting = result.settings[0]
    s = setting["speedups"]["pruned"]
    dense, pruned = setting["models"]["dense"], setting["models"]["pruned"]
    env = result.environment
    return {
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "device": env["device"], "dtype": env["dtype"], "torch_threads": env["torch_threads"],
        "attention": env["attention"],
        "dense_params": result.models["dense"]["params"], "pruned_params": result.models["pruned"]["params"],
        "dense_prefill_ms": dense["prefill_ms"]["median"],
        "pruned_prefill_ms": pruned["prefill_ms"]["median"],
        "dense_decode_ms_per_token": dense["decode_ms_per_token"]["median"],
        "pruned_decode_ms_per_token": pruned["decode_ms_per_token"]["median"],
        "prefill_speedup": s["prefill"]["median"], "decode_speedup": s["decode"]["median"],
        "ideal_prefill_speedup": s["ideal_prefill"], "ideal_decode_speedup": s["ideal_decode"],
        "prefill_efficiency": s["prefill_efficiency"], "decode_efficiency": s["decode_efficiency"],
    }


def format_quick_speedup(result: Mapping) -> str:
    """Two lines for the end of ``prune``/``accel``: measured speedups against the FLOP-ratio ideal."""
    r = result
    return (
        f"measured speedup ({r['device']}, torch threads={r['torch_threads']}, {r['dtype']}, "
        f"{r['attention']}; "
        f"batch {r['batch_size']}, prompt {r['prompt_len']}, {r['new_tokens']} new tokens, "
        f"median of {r['repeats']}; "
        f"params {r['dense_params'] / 1e6:.1f}M -> {r['pruned_params'] / 1e6:.1f}M):\n"
        f"  prefill {r['prefill_speedup']:.2f}x (ideal {r['ideal_prefill_speedup']:.2f}x, "
        f"{100 * r['prefill_efficiency']:.0f}%), "
        f"decode {r['decode_speedup']:.2f}x (ideal {r['ideal_decode_speedup']:.2f}x, "
        f"{100 * r['decode_efficiency']:.0f}%)"
    )


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to a (sub)parser (generated from :class:`BenchSettings`)."""
    add_flags(parser, BenchSettings)


def check_bench_output(path: str | Path) -> Path:
    """Before loading: the --output folder (which receives two files; other files in it stay) can be written."""
    out = Path(path).expanduser().absolute()
    if out.is_dir() and any(out.iterdir()):
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputPathError(f"--output '{path}' is not writable; choose a writable folder")
        return out
    return preflight_output(out)


def _load(spec: str | None, device: str, dtype: str):
    return load_model(spec, device=device, dtype=dtype)


def _unique_names(specs: Sequence[str]) -> list[str]:
    names: list[str] = []
    for spec in specs:
        base = Path(spec.rstrip("/")).name or spec
        name, n = base, 2
        while name in names or name == "dense":
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _measure(cfg: BenchSettings, log: Callable[[str], None]) -> tuple[BenchResult, dict]:
    """Load the dense and pruned models, check they belong together, and run the interleaved benchmark."""
    device = resolve_device(cfg.device)
    attention = choose_attention(cfg.attn, device, parse_dtype(cfg.dtype))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log(f"loading dense model {cfg.model or DEFAULT_MODEL_NAME}")
    dense, tokenizer = _load(cfg.model, str(device), cfg.dtype)
    models = {"dense": dense}
    for name, spec in zip(_unique_names(cfg.compare), cfg.compare, strict=True):
        log(f"loading {name} from {spec}")
        model, other_tokenizer = _load(spec, str(device), cfg.dtype)
        check_pruned_version(dense, model, name)
        check_same_tokenizer(tokenizer, other_tokenizer, name)
        models[name] = model
    result = benchmark_models(models, tokenizer, baseline="dense", batch_sizes=cfg.batch_sizes,
                              prompt_lens=cfg.prompt_lens, new_tokens=cfg.new_tokens, repeats=cfg.repeats,
                              warmup=cfg.warmup, attention=attention,
                              attention_fallback="eager" if cfg.attn == "auto" else None, seed=cfg.seed,
                              progress=log)
    return result, models


def run_bench(args: argparse.Namespace | BenchSettings) -> int:
    """Run ``adapt-engine bench``: check, load, measure interleaved, print the table, write JSON and PNG.

    Bad input (flags, models, output folder) is printed as one error line and gives exit code 2.
    """
    cfg = args if isinstance(args, BenchSettings) else from_args(BenchSettings, args)
    try:
        cfg.validate()
        out = check_bench_output(cfg.output)
        if cfg.engine != "hf":  # timed in a serving engine: engine_bench.py
            return run_engine_bench(cfg, out)
        result, models = _measure(cfg, lambda msg: print(msg, file=sys.stderr, flush=True))
    except AdaptEngineError as err:
        print(f"adapt-engine bench: error: {err}", file=sys.stderr)
        return 2
    result.config["models"] = {"dense": cfg.model or "default (SmolLM2-135M-Instruct)",
                               **dict(zip(list(models)[1:], cfg.compare, strict=True))}
    print(result.format_table())
    json_path = result.write_json(out / JSON_NAME)
    chart_path = result.write_chart(out / CHART_NAME)
    print(f"\nwrote {json_path} and {chart_path}")
    return 0
