"""Saving pruned models so they reload anywhere, and loading them back.

An output directory holds safetensors weights, a config.json that records every layer's head count,
KV head count and MLP width, the tokenizer, ``pruning_report.json``, and two small Python files
(``configuration_adapt_pruned.py``, ``modeling_adapt_pruned.py`` plus ``adapt_pruned_shapes.py``)
that subclass the stock transformers classes of the model's family. So the model loads with

* ``adapt_engine.load_pruned(path)``, or
* ``transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` — no edits to
  installed transformers files, no pickles.

The config's ``model_type`` is ``adapt_pruned_<family>`` so that stock loading without
``trust_remote_code`` fails loudly instead of building the unpruned shapes.

A model whose layers all have one shape (``--uniform-shape``) is saved as a **standard** model of its family
instead (``save_pruned(..., standard=True)``): the stock ``model_type`` and class, the uniform head counts, MLP
width, hidden size and an explicit head_dim in config.json, no per-layer lists and no remote code, so plain
``AutoModelForCausalLM.from_pretrained(path)`` builds it. Everything is written to a
temporary directory beside the target and swapped into place (``fsio.atomic_dir``), so a crash never
leaves half a model, and replacing an earlier output never leaves the path empty.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .adapters import (
    FAMILIES,
    LAYER_HEADS_KEY,
    LAYER_KV_HEADS_KEY,
    LAYER_MLP_KEY,
    PRUNED_PREFIX,
    DecoderAdapter,
    UnsupportedModelError,
)
from .dtypes import parse_dtype
from .errors import AdaptEngineError
from .fsio import atomic_dir, atomic_write_json, written_by_us
from .model_files import MAX_LAYERS, check_layer_count, read_safetensors
from .remote.adapt_pruned_shapes import apply_layer_shapes

REPORT_NAME = "pruning_report.json"
SHAPES_FILE = Path(__file__).parent / "remote" / "adapt_pruned_shapes.py"

_CONFIG_TEMPLATE = '''"""Config of an adapt-engine pruned {family} model: the stock config plus per-layer widths."""

from {config_module} import {config_class}


class AdaptPrunedConfig({config_class}):
    model_type = "{model_type}"
'''

_MODELING_TEMPLATE = '''"""An adapt-engine pruned {family} model: stock layers resized to the widths in config.json."""

from {modeling_module} import {causal_lm_class}

from .adapt_pruned_shapes import apply_layer_shapes
from .configuration_adapt_pruned import AdaptPrunedConfig


class AdaptPrunedForCausalLM({causal_lm_class}):
    config_class = AdaptPrunedConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, config)
'''


class PrunedModelError(AdaptEngineError, ValueError):
    """Raised when a saved pruned model is missing, corrupt or inconsistent."""


def _write_remote_code(folder: Path, family_name: str) -> None:
    fam = FAMILIES[family_name]
    fields = {**fam.__dict__, "family": family_name, "model_type": PRUNED_PREFIX + family_name}
    (folder / "configuration_adapt_pruned.py").write_text(_CONFIG_TEMPLATE.format(**fields))
    (folder / "modeling_adapt_pruned.py").write_text(_MODELING_TEMPLATE.format(**fields))
    shutil.copyfile(SHAPES_FILE, folder / "adapt_pruned_shapes.py")


def _json_default(obj):
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def standard_fields(adapter: DecoderAdapter) -> dict:
    """The config fields of a standard (uniform-shape) model, or a PrunedModelError if its layers differ."""
    shapes = adapter.shapes()
    first = shapes[0]
    if any(s != first for s in shapes) or first.num_heads == 0:
        raise PrunedModelError("a standard model needs every layer to have the same heads, KV heads and MLP width "
                               "(and attention in every layer); prune with --uniform-shape --allocation global")
    return {"model_type": adapter.family.model_type, "architectures": [adapter.family.causal_lm_class],
            "hidden_size": adapter.hidden_size, "head_dim": adapter.head_dim, "num_attention_heads": first.num_heads,
            "num_key_value_heads": first.num_kv_heads, "intermediate_size": first.intermediate_size}


def save_pruned(model, tokenizer, output_dir: str | Path, report: dict | None = None,
                write_weights: Callable[[Path], None] | None = None, standard: bool = False) -> Path:
    """Write a pruned (or unpruned) model in the reloadable adapt-engine format, atomically.

    An existing output is replaced only if adapt-engine wrote it (or it is empty); it is swapped with the
    new one in one step, so the path always holds a complete model. ``write_weights(folder)`` writes the
    safetensors instead of ``model.save_pretrained`` (a streamed model whose weights are not in memory).
    ``standard`` writes a plain model of the family (stock config, no remote code); its layers must be alike.
    """
    adapter = DecoderAdapter(model)
    stock = standard_fields(adapter) if standard else None
    adapter.record_shapes()
    family = adapter.family.model_type
    out = Path(output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise PrunedModelError(f"--output '{out}' exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not written_by_us(out):
        raise PrunedModelError(f"'{out}' holds files that adapt-engine did not write; refusing to replace it. "
                               f"Choose another output folder")
    with atomic_dir(out, overwrite=True, marker="model") as tmp:
        if write_weights is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            write_weights(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        if stock is not None:  # a plain model of its family: no per-layer lists, no remote code
            for key in (LAYER_HEADS_KEY, LAYER_KV_HEADS_KEY, LAYER_MLP_KEY, "adapt_base_model_type", "auto_map"):
                cfg.pop(key, None)
            cfg.update(stock)
        else:
            cfg["model_type"] = PRUNED_PREFIX + family
            cfg["adapt_base_model_type"] = family
            cfg["architectures"] = ["AdaptPrunedForCausalLM"]
            cfg["auto_map"] = {
                "AutoConfig": "configuration_adapt_pruned.AdaptPrunedConfig",
                "AutoModelForCausalLM": "modeling_adapt_pruned.AdaptPrunedForCausalLM",
            }
            _write_remote_code(tmp, family)
        atomic_write_json(cfg_path, cfg, default=_json_default)
        if report is not None:
            atomic_write_json(tmp / REPORT_NAME, report, default=_json_default)
    return out


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise PrunedModelError(f"'{path}' is not a directory; pass the --output folder of `adapt-engine prune`")
    if not cfg_path.is_file():
        raise PrunedModelError(f"'{path}' has no config.json; it is not a saved model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrunedModelError(f"{cfg_path} is corrupt ({err}); re-run the pruning or restore the file") from err
    if not isinstance(cfg, dict):
        raise PrunedModelError(f"{cfg_path} is corrupt (not a JSON object); re-run the pruning or restore the file")
    return cfg


def _check_widths(path: Path, raw: dict) -> None:
    """Per-layer widths must be lists of ints, one per layer, with whole query groups per KV head.

    MLP widths are positive; heads and KV heads are positive, or both 0 for a layer without attention.
    """
    n_layers = raw.get("num_hidden_layers")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= MAX_LAYERS:
        raise PrunedModelError(f"{path}/config.json: num_hidden_layers must be an integer from 1 to {MAX_LAYERS}, "
                               f"got {n_layers!r}; the config is damaged or was edited")
    for key in (LAYER_HEADS_KEY, LAYER_KV_HEADS_KEY, LAYER_MLP_KEY):
        if key not in raw:
            raise PrunedModelError(f"{path}/config.json lacks '{key}'; it was not written by adapt-engine")
        values = raw[key]
        if not isinstance(values, list) or len(values) != n_layers:
            raise PrunedModelError(f"{path}/config.json: '{key}' must list one width per layer ({n_layers}), got "
                                   f"{str(values)[:80]}; the config is damaged or was edited")
        least = 1 if key == LAYER_MLP_KEY else 0
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise PrunedModelError(f"{path}/config.json: {key}[{i}] is {v!r} ({type(v).__name__}); widths must "
                                       f"be integers >= {least}. The config is damaged or was edited")
    for i, (q, kv) in enumerate(zip(raw[LAYER_HEADS_KEY], raw[LAYER_KV_HEADS_KEY])):
        if q == 0 and kv == 0:
            continue  # a layer whose attention was removed (--deploy-target vllm)
        if q == 0 or kv == 0 or q % kv:
            raise PrunedModelError(f"{path}/config.json: layer {i} has {q} query heads for {kv} KV heads (not a "
                                   f"multiple); the config is damaged or was edited")


def pruned_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a saved pruned model (a clear error when there are none)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PrunedModelError(f"'{path}' has no .safetensors weights; the save is incomplete")
    return files


def pruned_class(family: str):
    """A stock ``*ForCausalLM`` subclass of ``family`` whose layers take the widths in its config."""
    fam = FAMILIES[family]
    base = getattr(importlib.import_module(fam.modeling_module), fam.causal_lm_class)

    def __init__(self, config):
        base.__init__(self, config)
        apply_layer_shapes(self, config)

    return type(f"AdaptPruned{base.__name__}", (base,), {"__init__": __init__})


def _check_weights(path: Path, model_cls, config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare tensor names and shapes in the safetensors headers with what the config implies."""
    with torch.device("meta"):
        skeleton = model_cls(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for k, shape in shapes.items():
        if k not in expected:
            raise PrunedModelError(f"'{path}' holds weight '{k}' that its config.json has no place for; "
                                   f"the folder mixes files from different models")
        if expected[k] != shape:
            raise PrunedModelError(
                f"weight '{k}' has shape {shape} but config.json implies {expected[k]}; the config and the "
                f"weights come from different prunings"
            )
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in expected if k not in shapes and k not in tied and "rotary" not in k]
    if missing:
        raise PrunedModelError(f"'{path}' lacks weights {missing[:5]}; the save is incomplete")


def load_pruned(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None):
    """Load a model saved by :func:`save_pruned` with stock transformers classes (no remote code).

    Loads in float32 unless ``dtype`` is given, whatever dtype the weights are stored in (the rule of
    ``models.load_model`` too). Config and weight headers are checked before anything is built.
    """
    path = Path(path)
    model_cls, config = pruned_config(path)
    model = model_cls.from_pretrained(path, config=config, dtype=parse_dtype(dtype), use_safetensors=True)
    model.to(device)
    model.eval()
    return model


def pruned_config(path: Path):
    """(model class, config) of a saved pruned model, with config and weight headers checked."""
    raw = _read_config(path)
    family = raw.get("adapt_base_model_type") or str(raw.get("model_type", "")).removeprefix(PRUNED_PREFIX)
    if not isinstance(family, str) or family not in FAMILIES:
        raise UnsupportedModelError(
            f"{path}/config.json names model family '{family}'; supported: {', '.join(sorted(FAMILIES))}"
        )
    standard = raw.get("model_type") == family and LAYER_HEADS_KEY not in raw  # a --uniform-shape output
    if not standard:
        _check_widths(path, raw)
    weights = read_safetensors(pruned_weight_files(path), error=PrunedModelError)
    check_layer_count(raw, weights, str(path), error=PrunedModelError)
    fam = FAMILIES[family]
    config_cls = getattr(importlib.import_module(fam.config_module), fam.config_class)
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures", "model_type")}
    try:
        config = config_cls(**fields)
    except Exception as err:  # noqa: BLE001 - strict config validation raises several types
        raise PrunedModelError(f"{path}/config.json is invalid for a {family} model: {err}") from err
    fam_cls = getattr(importlib.import_module(fam.modeling_module), fam.causal_lm_class)
    model_cls = fam_cls if standard else pruned_class(family)
    _check_weights(path, model_cls, config, weights.shapes)
    return model_cls, config


def load_pruned_tokenizer(path: str | Path):
    """Tokenizer of a pruned output folder, without running its remote code or prompting."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json; our model_type is unknown to stock transformers, which it only
    # warns about before falling back to the tokenizer files themselves.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)
