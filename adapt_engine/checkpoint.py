"""Atomic training checkpoints for Adapt-Accel, and resuming from them.

Layout of a checkpoint folder (``<dir>/step-000042/``)::

    model/        the (pruned) model in the reloadable save_pruned format: safetensors + config.json with
                  every layer's head count, KV head count and MLP width, so the shapes are rebuilt
    trainer.json + trainer.safetensors
                  optimizer state, schedule, data position, RNG states of every rank, run bookkeeping
                  (``tensor_tree``: plain data, never a pickle, so a forged checkpoint cannot run code)
    meta.json     format version, position, and a SHA-256 of every file above (written last)

and ``<dir>/latest.json`` names the newest complete one. A checkpoint is written into a temporary
folder and renamed to a name no other checkpoint has (a second checkpoint of the same step, after a
phase without training windows, gets ``step-N.1``); only then does ``latest.json`` move to it, and
only after that are older checkpoints removed. So at every instant of a ``kill -9`` the pointer names
a complete checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import AdaptEngineError
from .fsio import atomic_dir, atomic_write_json, recover_interrupted
from .saving import load_pruned, load_pruned_tokenizer, save_pruned
from .tensor_tree import TreeFormatError, load_tree, save_tree

FORMAT_VERSION = 2  # 1: trainer.pt (a pickle; no longer read)
LATEST = "latest.json"
META = "meta.json"
TRAINER = "trainer"  # trainer.json + trainer.safetensors
LEGACY_TRAINER = "trainer.pt"
MODEL_DIR = "model"
MARKER = ".adapt-engine-checkpoints"  # written into every checkpoint folder adapt-engine creates


class CheckpointError(AdaptEngineError, ValueError):
    """A checkpoint is missing, corrupt, or does not belong to this run."""


def check_checkpoint_dir(path: str | Path) -> Path:
    """Refuse (read-only) a checkpoint folder that is a file, or non-empty and not created by adapt-engine."""
    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"--checkpoint-dir '{path}' is a file; give a folder path")
    if folder.is_dir() and not (folder / MARKER).is_file() and any(folder.iterdir()):
        raise CheckpointError(
            f"--checkpoint-dir '{path}' exists, is not empty and was not created by adapt-engine (it has no "
            f"{MARKER} file); refusing to write into it or delete anything in it. Give a new or empty folder"
        )
    return folder


def open_checkpoint_dir(path: str | Path, *, resume: bool) -> Path:
    """Create or adopt a checkpoint folder; refuse any non-empty folder that adapt-engine did not create.

    A fresh run in a folder of ours from an earlier run removes that run's checkpoints (only what
    adapt-engine wrote); ``resume`` keeps them. The folder is marked so that later runs recognise it.
    """
    folder = check_checkpoint_dir(path)
    if folder.is_dir() and not resume:
        _remove_ours(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        atomic_write_json(folder / MARKER, {"written_by": "adapt-engine", "kind": "checkpoints"})
    return folder


def _remove_ours(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.name.startswith(("step-", ".step-")) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name == LATEST or (entry.name.startswith(f".{LATEST}.") and entry.is_file()):
            entry.unlink(missing_ok=True)


def remove_checkpoint_dir(path: str | Path) -> None:
    """Delete what adapt-engine wrote in a checkpoint folder, and the folder itself only if that empties it."""
    folder = Path(path).expanduser().absolute()
    if not folder.is_dir() or not (folder / MARKER).is_file():
        return
    _remove_ours(folder)
    (folder / MARKER).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # fails, keeping it, when the user put other files there


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict:
    """Every RNG this process draws from (torch CPU and CUDA, Python, NumPy if present)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])


@contextlib.contextmanager
def quiet_transformers():
    """No "Writing model shards" bar in the middle of the training progress bars."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


_NAME = re.compile(r"step-(\d{9})(?:\.(\d+))?")


def _order(name: str) -> tuple[int, int] | None:
    """(step, repeat) of a checkpoint folder name, or None for anything else."""
    m = _NAME.fullmatch(name)
    return None if m is None else (int(m.group(1)), int(m.group(2) or 0))


def _free_name(directory: Path, step: int) -> str:
    """``step-N``, or ``step-N.k`` when earlier checkpoints of this step exist (never reuse a folder)."""
    base = f"step-{step:09d}"
    taken = [o[1] for p in directory.glob(base + "*") if (o := _order(p.name)) is not None and o[0] == step]
    return base if not taken else f"{base}.{max(taken) + 1}"


def save_checkpoint(
    directory: str | Path, step: int, model, tokenizer, trainer_state: dict, keep: int = 1,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest.json`` at it, keep the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = _free_name(directory, step)
    final = directory / name
    with atomic_dir(final, marker=None) as tmp:
        with quiet_transformers():
            save_pruned(model, tokenizer, tmp / MODEL_DIR, report=None)
        save_tree(trainer_state, tmp / TRAINER)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": {str(p.relative_to(tmp)): _sha256(p) for p in files},
        }
        atomic_write_json(tmp / META, meta, indent=1)
    atomic_write_json(directory / LATEST, {"checkpoint": name, "step": step}, indent=None)
    _prune_old(directory, keep=keep, current=name)
    return final


def _prune_old(directory: Path, keep: int, current: str) -> None:
    """Remove checkpoints older than the newest ``keep`` (never ``current``), and orphans newer than it."""
    now = _order(current)
    ckpts = sorted((o, p) for p in directory.glob("step-*") if p.is_dir() and (o := _order(p.name)) is not None)
    older = [p for o, p in ckpts if o < now]
    newer = [p for o, p in ckpts if o > now]  # written by a run killed before it moved the pointer
    for old in older[: max(0, len(older) - (max(1, keep) - 1))] + newer:
        shutil.rmtree(old, ignore_errors=True)
    for name in {p.name.split(".tmp-")[0].lstrip(".") for p in directory.glob(".step-*.tmp-*")}:
        recover_interrupted(directory / name)  # temporaries of killed writers (live writers' are kept)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The folder ``latest.json`` points to, or None when the directory holds no checkpoint yet."""
    directory = Path(directory)
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError, OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pointer} is corrupt ({err}); delete it to resume from an older step-* folder "
                              f"by hand, or start over without --resume") from err
    if not isinstance(name, str) or _order(name) is None:
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint folder name (step-N); the "
                              f"checkpoint folder was edited. Start over without --resume")
    path = directory / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names '{name}', which does not exist in {directory}; the checkpoint "
                              f"folder was edited. Start over without --resume")
    return path


def verify_checkpoint(path: str | Path) -> dict:
    """Check the format version and every file's SHA-256; returns meta.json's content."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} has no {META}: the checkpoint is incomplete; start over without --resume")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{meta_path} is corrupt ({err}); start over without --resume") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{meta_path} is not a checkpoint index; start over without --resume")
    if meta.get("format_version") == 1 or LEGACY_TRAINER in meta["files"]:
        raise CheckpointError(
            f"{path} was written by an older adapt-engine (checkpoint format 1, a pickled {LEGACY_TRAINER}, which "
            f"this version never loads because unpickling can run code). Start over without --resume, or finish "
            f"the run with the adapt-engine version that wrote it"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format_version')}, this adapt-engine reads "
            f"{FORMAT_VERSION}; resume it with the adapt-engine version that wrote it"
        )
    for rel, digest in meta["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{meta_path} lists '{rel}', outside the checkpoint; the checkpoint was edited")
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing; the checkpoint is damaged")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt (SHA-256 mismatch); the checkpoint is damaged. "
                                  f"Start over without --resume")
    return meta


def load_trainer_state(path: str | Path) -> dict:
    """The trainer state of a verified checkpoint folder (plain data and tensors; nothing is unpickled)."""
    path = Path(path)
    try:
        state = load_tree(path / TRAINER)
    except TreeFormatError as err:
        raise CheckpointError(f"the trainer state in {path} is damaged ({err}); start over without --resume") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"the trainer state in {path} is not a mapping; the checkpoint is damaged")
    return state


def load_checkpoint(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, trainer_state) from a verified checkpoint folder; the model has the recorded layer widths."""
    path = Path(path)
    verify_checkpoint(path)
    model = load_pruned(path / MODEL_DIR, device=device, dtype=dtype)
    return model, load_trainer_state(path)


def load_checkpoint_tokenizer(path: str | Path):
    """The tokenizer saved with a checkpoint (loaded as a pruned model's: no remote code, no model-type warning)."""
    return load_pruned_tokenizer(Path(path) / MODEL_DIR)


def check_compatible(saved: dict, current: dict) -> None:
    """Raise naming every run setting that differs between a checkpoint and this invocation."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            "--resume with settings that differ from the interrupted run:\n  " + "\n  ".join(diffs)
            + "\nRe-run with the original settings, or start over without --resume (and a fresh --output)"
        )
