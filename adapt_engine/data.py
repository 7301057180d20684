"""Text for calibration, training and evaluation, from local files or ``datasets``.

The default corpus is English prose that ships with CPython (``pydoc_data.topics``, ~480 kB), so every
command works offline. It is split once, deterministically, by topic: ``train`` (calibration and
training, the first 90 %) and ``heldout`` (evaluation, the last 10 %) never share text. ``search`` splits
``train`` once more, by document: ``pool`` (its first 90 %, the calibration windows a search picks from) and
``validation`` (its last 10 %, the search's objective), so a search never scores on its calibration text
nor on the held-out text of the final evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from pydoc_data import topics

import torch

from .errors import AdaptEngineError

DEFAULT_DATA = "pydoc"
SPLITS = ("train", "heldout", "all", "pool", "validation")
HELDOUT_FRACTION = 0.10
VALIDATION_FRACTION = 0.10  # of the train split's documents
TEXT_FIELDS = ("text", "content", "document", "body")


class DataError(AdaptEngineError, ValueError):
    """Raised for missing, unreadable or too-small text data."""


def _pydoc_documents() -> list[str]:
    return [topics.topics[k] for k in sorted(topics.topics)]


def _tail_cut(docs: list[str], fraction: float, what: str) -> int:
    if len(docs) < 2:
        raise DataError(
            f"the data holds {len(docs)} document; separating {what} needs at least 2. "
            f"Separate documents with a blank line (.txt) or put one JSON record per line (.jsonl)"
        )
    return len(docs) - max(1, int(round(len(docs) * fraction)))


def _split(docs: list[str], split: str) -> list[str]:
    if split == "all":
        return docs
    cut = _tail_cut(docs, HELDOUT_FRACTION, "training text from held-out text")
    if split == "heldout":
        return docs[cut:]
    train = docs[:cut]
    if split == "train":
        return train
    vcut = _tail_cut(train, VALIDATION_FRACTION, "the calibration pool from the validation text (in the train split)")
    return train[:vcut] if split == "pool" else train[vcut:]


def _text_of(record: dict, source: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{source}: each record must be a JSON object with a text field, got {type(record).__name__}")
    for key in TEXT_FIELDS:
        if isinstance(record.get(key), str):
            return record[key]
    raise DataError(f"{source}: records need a text field (one of {', '.join(TEXT_FIELDS)}); got {sorted(record)}")


def _file_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ".text"):
        text = path.read_text(encoding="utf-8", errors="replace")
        # Blank-line separated paragraphs are the documents.
        return [p for p in text.split("\n\n") if p.strip()] or [text]
    if suffix in (".jsonl", ".json"):
        docs = []
        with path.open(encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        docs.append(_text_of(json.loads(line), f"{path}:{n}"))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{n} is not valid JSON ({err}); use one JSON object per line") from err
        return docs
    if suffix == ".parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return [_text_of(r, str(path)) for r in ds]
    raise DataError(f"{path}: unsupported file type '{suffix}'; use .txt, .jsonl or .parquet")


def _hub_documents(name: str) -> list[str]:
    import datasets

    dataset_name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split="train")
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise DataError(
            f"could not load dataset '{name}' ({type(err).__name__}: {err}). Pass a local .txt/.jsonl/.parquet "
            f"file, or omit the option to use the built-in offline text."
        ) from err
    return [_text_of(r, name) for r in ds]


def load_documents(spec: str | None, split: str = "train") -> list[str]:
    """Documents of a data spec: None/"pydoc" (built-in), a local file or folder, or a datasets name."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got '{split}'")
    spec = spec or DEFAULT_DATA
    if spec == DEFAULT_DATA:
        docs = _pydoc_documents()
    elif os.path.exists(spec):
        path = Path(spec)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        docs = [d for f in files for d in _file_documents(f)]
    elif spec.endswith((".txt", ".jsonl", ".json", ".parquet")) or spec.startswith(("/", "./", "../", "~")) \
            or spec.count("/") > 1:
        raise DataError(f"data path '{spec}' does not exist (relative paths start at {Path.cwd()})")
    else:
        docs = _hub_documents(spec)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text found in '{spec}'")
    return _split(docs, split)


def data_fingerprint(spec: str | None) -> str:
    """A digest that changes when the text a data spec names changes (file names, sizes and contents).

    For resume checks: the same path with edited contents gives another digest. Hub datasets are
    identified by their name only (their revision is the hub's business).
    """
    spec = spec or DEFAULT_DATA
    if spec == DEFAULT_DATA or not os.path.exists(spec):
        return f"name:{spec}"
    path = Path(spec)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def load_text(spec: str | None, split: str = "train") -> str:
    """All documents of a data spec joined into one text."""
    return "\n\n".join(load_documents(spec, split))


def objective_text(objective_data: str | None, calib_pool: str | None) -> str:
    """A search's validation text: all of ``objective_data``, or else the validation split of the pool's text
    (neither the calibration pool nor the held-out split)."""
    if objective_data is not None:
        return load_text(objective_data, "all")
    return load_text(calib_pool, "validation")


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D stream of token ids (no special tokens; documents are already joined)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def pool_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The calibration pool as consecutive non-overlapping ``seq_len`` windows (``[n, seq_len]``; the tail that
    does not fill a window is left out). ``--calib-indices`` and ``search`` index these rows."""
    if seq_len < 2:
        raise DataError(f"need seq_len >= 2, got {seq_len}")
    available = ids.numel() // seq_len
    if available < 1:
        raise DataError(f"the calibration pool has {ids.numel()} tokens, fewer than one {seq_len}-token window; "
                        f"pass more text or a shorter --calib-seq-len")
    return ids[: available * seq_len].view(available, seq_len)


def read_calib_indices(path: str) -> list[int]:
    """Window indices from a ``--calib-indices`` JSON file: a list of integers, or an object whose
    ``calib_indices`` (``search``'s best.json) or ``indices`` is one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"--calib-indices {path}: cannot read it ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise DataError(f"--calib-indices {path} is not valid JSON ({err})") from err
    if isinstance(data, dict):
        data = data.get("calib_indices", data.get("indices"))
    if not isinstance(data, list) or not data or not all(isinstance(i, int) and i >= 0 for i in data):
        raise DataError(f"--calib-indices {path} must hold a non-empty list of window indices (integers >= 0), "
                        f"or an object with one under 'calib_indices' or 'indices'")
    return data


def select_windows(windows: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """The rows ``indices`` of the pool's windows, in the order given (a repeated index counts twice)."""
    bad = [i for i in indices if i >= windows.shape[0]]
    if bad:
        raise DataError(f"calibration window index {bad[0]} is out of range: the pool has {windows.shape[0]} "
                        f"windows (0-{windows.shape[0] - 1}) at this --calib-seq-len; use the pool and sequence "
                        f"length the indices were chosen from")
    return windows[torch.tensor(indices, dtype=torch.long)].clone()


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` non-overlapping windows of ``seq_len`` tokens, chosen at random without replacement."""
    if num_samples < 1 or seq_len < 2:
        raise DataError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    available = ids.numel() // seq_len
    if available < num_samples:
        raise DataError(
            f"not enough text: {num_samples} samples x {seq_len} tokens need {num_samples * seq_len} tokens, "
            f"the data has {ids.numel()} ({available} windows). Pass more text, or lower the number of "
            f"samples or the sequence length."
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=gen)[:num_samples].sort().values
    windows = ids[: available * seq_len].view(available, seq_len)
    return windows[chosen].clone()
