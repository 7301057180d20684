"""Checks of model files before anything is built from them: safetensors and GGUF headers, weight pickles.

Reading a header costs milliseconds; building a model from a damaged or forged file can fail deep inside
transformers with a bare traceback, or take minutes (a config claiming 100 000 layers). So every loader
first checks here that the files are complete, that the config's layer count matches the weights, and
that a ``pytorch_model.bin`` holds nothing but tensors. The same headers give the parameter count for
disk-space estimates without loading any weight.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .errors import AdaptEngineError

LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MAX_LAYERS = 1024  # the deepest released decoder LLMs have ~130 layers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelLoadError(AdaptEngineError, ValueError):
    """A model cannot be found, or its files are missing, damaged or unsafe to load."""


@dataclass(frozen=True)
class WeightsSummary:
    """What the headers of a model's weight files say."""

    shapes: dict[str, tuple[int, ...]]

    @property
    def num_params(self) -> int:
        """Elements over all tensors (tied weights are stored once)."""
        total = 0
        for shape in self.shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    @property
    def num_layers(self) -> int:
        """Decoder layers present in the weights (highest ``layers.N.`` index + 1)."""
        found = [int(m.group(1)) for k in self.shapes if (m := LAYER_KEY.search(k))]
        return max(found) + 1 if found else 0


def read_safetensors(files: list[Path], error: type[Exception] = ModelLoadError) -> WeightsSummary:
    """Tensor shapes from safetensors headers; a truncated or corrupt file raises ``error`` naming it."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    shapes[k] = tuple(fh.get_slice(k).get_shape())
        except (SafetensorError, OSError) as err:
            raise error(f"{f} is corrupt or truncated ({err}); download or save the model again") from err
    return WeightsSummary(shapes)


def check_bin_weights(files: list[Path]) -> None:
    """Refuse ``pytorch_model.bin`` files that are damaged or hold anything but tensors (never unpickled freely)."""
    for f in files:
        if not zipfile.is_zipfile(f):
            raise ModelLoadError(f"{f} is not a torch zip archive (truncated, or the legacy pickle format); "
                                 f"convert the model to safetensors")
        try:  # weights_only: the restricted unpickler builds tensors and plain containers only
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise ModelLoadError(
                f"{f} holds Python objects besides tensors; adapt-engine does not unpickle those (loading them "
                f"could run code). Convert the model to safetensors with the tool that made it"
            ) from err
        except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
            raise ModelLoadError(f"{f} is damaged ({err}); download or save the model again") from err


def read_config(folder: Path) -> dict:
    """config.json of a model folder, with clear errors for a missing, unreadable or non-object file."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"'{folder}' is not a model folder: it has no config.json (a transformers model folder holds "
            f"config.json, *.safetensors weights and tokenizer files). Pass such a folder, a .gguf file, a hub "
            f"id (org/name), or omit --model for the built-in SmolLM2-135M"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} cannot be read ({err}); restore the file") from err
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path} is not a JSON object; restore the file")
    return cfg


def check_layer_count(cfg: dict, weights: WeightsSummary, where: str, error: type[Exception] = ModelLoadError) -> int:
    """The config's ``num_hidden_layers``, checked to be an int that agrees with the weights (before any build)."""
    n = cfg.get("num_hidden_layers")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_LAYERS:
        raise error(f"{where}/config.json: num_hidden_layers must be an integer from 1 to {MAX_LAYERS}, got {n!r}; "
                    f"the config is damaged or forged")
    have = weights.num_layers
    if have and have != n:
        raise error(f"{where}/config.json declares {n} decoder layers but the weights hold {have}; the config and "
                    f"the weights belong to different models")
    return n


def check_model_folder(folder: Path, need_tokenizer: bool = True) -> WeightsSummary | None:
    """Check a plain transformers model folder before loading it; the safetensors summary if it has one."""
    cfg = read_config(folder)
    st = sorted(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not st and not bins:
        raise ModelLoadError(f"'{folder}' has a config.json but no weights (*.safetensors or pytorch_model.bin)")
    if need_tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"'{folder}' has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the "
                             f"tokenizer of the model into it")
    if st:
        summary = read_safetensors(st)
        check_layer_count(cfg, summary, str(folder))
        return summary
    check_bin_weights(bins)
    check_layer_count(cfg, WeightsSummary({}), str(folder))
    return None


# -- GGUF -------------------------------------------------------------------------------------------------
# Layout (v2/v3): magic, version u32, n_tensors u64, n_kv u64, key/values, tensor infos, aligned data.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 32  # no real file has more tensors, keys or array items; bounds a forged header


@dataclass(frozen=True)
class GGUFSummary:
    """Parameter count, layer count and the byte length the tensor data needs."""

    num_params: int
    num_layers: int
    data_end: int


class _Truncated(Exception):
    pass


def _read(fh: BinaryIO, fmt: str):
    size = struct.calcsize("<" + fmt)
    raw = fh.read(size)
    if len(raw) != size:
        raise _Truncated
    return struct.unpack("<" + fmt, raw)[0]


def _count(fh: BinaryIO) -> int:
    n = _read(fh, "Q")
    if n > _MAX_COUNT:
        raise ValueError(f"implausible count {n}")
    return n


def _string(fh: BinaryIO) -> bytes:
    n = _count(fh)
    raw = fh.read(n)
    if len(raw) != n:
        raise _Truncated
    return raw


def _value(fh: BinaryIO, vtype: int):
    if vtype in _SCALARS:
        return _read(fh, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(fh)
    if vtype == _ARRAY:
        etype, n = _read(fh, "I"), _count(fh)
        if etype in _SCALARS:  # skip numbers in one seek
            fh.seek(n * struct.calcsize("<" + _SCALARS[etype]), 1)
            return None
        for _ in range(n):
            _value(fh, etype)
        return None
    raise ValueError(f"unknown value type {vtype}")


def read_gguf(path: Path) -> GGUFSummary:
    """Parse a GGUF file's header (no tensor data is read); a truncated or malformed file is a clear error."""
    from gguf.constants import GGML_QUANT_SIZES  # the gguf package takes ~0.1 s to import: only for .gguf files

    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError("no GGUF magic number")
            version = _read(fh, "I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (readable: 2, 3)")
            n_tensors, n_kv = _count(fh), _count(fh)
            alignment, layers = 32, 0
            for _ in range(n_kv):
                key = _string(fh)
                value = _value(fh, _read(fh, "I"))
                if key == b"general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
                elif key.endswith(b".block_count") and isinstance(value, int):
                    layers = value
            params, end = 0, 0
            for _ in range(n_tensors):
                _string(fh)
                dims = [_read(fh, "Q") for _ in range(_read(fh, "I"))]
                ttype, offset = _read(fh, "I"), _read(fh, "Q")
                n = 1
                for d in dims:
                    n *= d
                if ttype not in GGML_QUANT_SIZES:
                    raise ValueError(f"unknown tensor type {ttype}")
                block, type_size = GGML_QUANT_SIZES[ttype]
                params += n
                end = max(end, offset + n // block * type_size)
            start = -(-fh.tell() // alignment) * alignment
    except _Truncated:
        raise ModelLoadError(f"{path} is truncated inside its header ({size} bytes); download it again") from None
    except (ValueError, OverflowError, struct.error) as err:
        raise ModelLoadError(f"{path} is not a valid GGUF file ({err}); pass a .gguf model file") from err
    if start + end > size:
        raise ModelLoadError(f"{path} is truncated: its tensors need {start + end:,} bytes, the file has {size:,}; "
                             f"download it again")
    if not 1 <= layers <= MAX_LAYERS:
        raise ModelLoadError(f"{path} declares {layers} decoder layers; it is damaged or not a decoder LLM")
    return GGUFSummary(params, layers, start + end)
