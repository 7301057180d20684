"""Saving nested run state (optimizer, RNGs, bookkeeping) as safetensors + JSON, never as a pickle.

A checkpoint is a user-supplied file the moment it is resumed, and unpickling runs whatever code the
file names, so the trainer state is stored as two plain-data files instead:

* ``<stem>.json``        the tree: every node tagged with its Python type, so tuples come back as tuples
  (``random.setstate`` and ``np.random.set_state`` insist), dict keys keep their types (an optimizer's
  state is keyed by int), and floats round-trip exactly (JSON floats are shortest-repr, NaN/inf allowed);
* ``<stem>.safetensors`` every torch tensor and NumPy array, bit for bit (NumPy arrays as raw bytes with
  their dtype and shape in the JSON; object arrays are refused both ways).

Reading only builds the types listed in ``_TAGS``; anything else in the file is an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import AdaptEngineError
from .fsio import atomic_write

TREE_FORMAT = 1
_TAGS = ("list", "tuple", "dict", "tensor", "ndarray", "npscalar", "float")


class TreeFormatError(AdaptEngineError, ValueError):
    """A saved state tree is corrupt, truncated, or holds something this reader does not build."""


class _Writer:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()

    def _add(self, t: torch.Tensor) -> str:
        key = f"t{len(self.tensors)}"
        t = t.detach().to("cpu")
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # safetensors refuses views and tensors sharing storage: copy those (optimizer moments own theirs)
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == storage.nbytes()
        if not whole or ptr in self._storages:
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            self._storages.add(ptr)
        self.tensors[key] = t
        return key

    def encode(self, obj: Any) -> Any:
        if isinstance(obj, np.generic):  # before float: np.float64 is a float subclass
            return {"npscalar": self._array(np.asarray(obj))}
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):  # strict JSON has no NaN/inf: store those by their hex spelling
            return obj if math.isfinite(obj) else {"float": obj.hex()}
        if isinstance(obj, torch.Tensor):
            return {"tensor": self._add(obj)}
        if isinstance(obj, np.ndarray):
            return {"ndarray": self._array(obj)}
        if isinstance(obj, tuple):
            return {"tuple": [self.encode(v) for v in obj]}
        if isinstance(obj, list):
            return {"list": [self.encode(v) for v in obj]}
        if isinstance(obj, dict):
            return {"dict": [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
        raise TypeError(f"cannot save a {type(obj).__name__} in a state tree; convert it to plain data first")

    def _array(self, arr: np.ndarray) -> list:
        if arr.dtype.hasobject:
            raise TypeError("cannot save a NumPy object array in a state tree")
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        return [self._add(torch.from_numpy(raw.copy())), arr.dtype.str, list(arr.shape)]


def _float(node: Any) -> float:
    try:
        return float.fromhex(node)
    except (TypeError, ValueError) as err:
        raise TreeFormatError(f"bad float spelling {node!r}") from err


class _Reader:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def _tensor(self, key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise TreeFormatError(f"the tree names tensor {key!r}, which the tensor file lacks")
        return self.tensors[key]

    def _array(self, node: Any) -> np.ndarray:
        if not (isinstance(node, list) and len(node) == 3 and isinstance(node[1], str) and isinstance(node[2], list)):
            raise TreeFormatError(f"bad array entry {node!r}")
        key, dtype_str, shape = node
        try:
            dtype = np.dtype(dtype_str)
        except TypeError as err:
            raise TreeFormatError(f"bad array dtype {dtype_str!r}") from err
        if dtype.hasobject:
            raise TreeFormatError("the tree holds a NumPy object array; refusing to build it")
        raw = self._tensor(key)
        if raw.dtype != torch.uint8 or raw.dim() != 1:
            raise TreeFormatError(f"array bytes {key!r} have the wrong layout")
        try:
            return np.frombuffer(raw.numpy().tobytes(), dtype=dtype).reshape(shape)
        except ValueError as err:
            raise TreeFormatError(f"array {key!r} does not match its dtype {dtype_str} and shape {shape}") from err

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, dict) and len(node) == 1:
            (tag, value), = node.items()
            if tag in ("list", "tuple") and isinstance(value, list):
                items = [self.decode(v) for v in value]
                return items if tag == "list" else tuple(items)
            if tag == "dict" and isinstance(value, list):
                if not all(isinstance(kv, list) and len(kv) == 2 for kv in value):
                    raise TreeFormatError("bad dict entry in the tree")
                out = {}
                for k, v in value:
                    key = self.decode(k)
                    try:
                        out[key] = self.decode(v)
                    except TypeError as err:  # an unhashable key (a list) in a forged file
                        raise TreeFormatError(f"unusable dict key {k!r}") from err
                return out
            if tag == "tensor":
                return self._tensor(value)
            if tag == "ndarray":
                return self._array(value)
            if tag == "npscalar":
                arr = self._array(value)
                if arr.shape != ():
                    raise TreeFormatError("a NumPy scalar entry holds an array")
                return arr[()]
            if tag == "float":
                return _float(value)
        raise TreeFormatError(f"unknown node in the tree (known: {', '.join(_TAGS)}): {str(node)[:80]}")


def save_tree(obj: Any, stem: str | Path) -> list[Path]:
    """Write ``obj`` to ``<stem>.json`` and ``<stem>.safetensors`` atomically; returns both paths."""
    stem = Path(stem)
    writer = _Writer()
    tree = {"format": TREE_FORMAT, "tree": writer.encode(obj)}
    tensors_path = stem.with_name(stem.name + ".safetensors")
    json_path = stem.with_name(stem.name + ".json")
    atomic_write(tensors_path, lambda tmp: save_file(writer.tensors, str(tmp)))
    atomic_write(json_path, json.dumps(tree, allow_nan=False) + "\n")
    return [json_path, tensors_path]


def load_tree(stem: str | Path) -> Any:
    """Inverse of :func:`save_tree`: the same nested structure, tensors on the CPU, bit for bit."""
    stem = Path(stem)
    json_path = stem.with_name(stem.name + ".json")
    tensors_path = stem.with_name(stem.name + ".safetensors")
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise TreeFormatError(f"{json_path} cannot be read ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != TREE_FORMAT or "tree" not in doc:
        raise TreeFormatError(f"{json_path} is not a state tree of format {TREE_FORMAT}")
    try:
        tensors = load_file(str(tensors_path), device="cpu")
    except (OSError, SafetensorError) as err:
        raise TreeFormatError(f"{tensors_path} cannot be read ({err})") from err
    try:
        return _Reader(tensors).decode(doc["tree"])
    except RecursionError as err:  # a forged tree nested deeper than any state we write
        raise TreeFormatError(f"{json_path} is nested too deeply to be a saved state") from err
