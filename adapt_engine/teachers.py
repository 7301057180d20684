"""The teachers of ``accel --distill``: snapshots of the model as it shrinks, kept on disk in the reloadable
pruned-model format, NutePrune's rule for which one teaches the current student, and the one teacher that is
resident at a time.

Sizes are parameter counts. NutePrune (seeds/003 §3.2) states its rule in mask sparsity ŝ; here
``ŝ(M) = 1 − |M| / |M_0|``, the fraction of the *original total* parameter count that is gone (embeddings and
norms included, since they count in what the student must hold). Eq. 8 gives teacher T the students with
``ŝ(T) + g < ŝ(S) < ŝ(T) + g + i`` and Eq. 9 gives the original model T_0 those with ``ŝ(S) < g + i``; with
snapshots taken every ``i`` of sparsity, that is: the teacher of S is the snapshot with the largest ŝ(T) not
above ``ŝ(S) − g``, and the original when no snapshot is that much larger (:func:`select_teacher`).
Snapshots exist only at phase boundaries (the size changes only when a phase prunes), so the interval is
measured between boundaries (:func:`snapshot_due`).
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import torch

from .checkpoint import MARKER, check_checkpoint_dir, quiet_transformers
from .errors import AdaptEngineError
from .fsio import atomic_write_json
from .saving import load_pruned, save_pruned

ORIGINAL = "snapshot-original"  # the unpruned model: T_0, and the teacher of --distill kd
SNAPSHOT_PREFIX = "snapshot-"
TOLERANCE = 1e-9  # sizes are ratios of integers: compare them with a little slack


class SnapshotError(AdaptEngineError, FileNotFoundError):
    """A snapshot the checkpoint records is missing: the run folder was edited."""


def sparsity_of(params: int, original: int) -> float:
    """ŝ of a model: the fraction of the original parameter count it no longer has."""
    return 1.0 - params / original


def select_teacher(snapshots: list[dict], student_params: int, original: int, gap: float) -> dict:
    """NutePrune Eq. 8-9 on parameter counts: the most pruned snapshot at least ``gap`` (of the original) larger
    than the student, else the original. ``snapshots`` are ``{"name", "params"}`` records; the original is the
    one with ``params == original``."""
    s_student = sparsity_of(student_params, original)
    ok = [s for s in snapshots if sparsity_of(s["params"], original) <= s_student - gap + TOLERANCE]
    if not ok:
        return next(s for s in snapshots if s["params"] == original)
    return max(ok, key=lambda s: (sparsity_of(s["params"], original), s["name"]))


def snapshot_due(snapshots: list[dict], params: int, original: int, interval: float) -> bool:
    """Whether a model of ``params`` has shrunk by ``interval`` of the original since the newest snapshot."""
    newest = min(s["params"] for s in snapshots)
    return newest > params and (newest - params) / original >= interval - TOLERANCE


def unreachable(snapshots: list[dict], teacher: dict, original: int) -> list[dict]:
    """Snapshots no later student can be taught by: larger than the current teacher (students only shrink and
    the rule picks ever smaller teachers), except the original."""
    return [s for s in snapshots if original != s["params"] > teacher["params"]]


class SnapshotStore:
    """The ``snapshots/`` folder of a run: one reloadable pruned-model folder per snapshot, written atomically."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def open(self, *, fresh: bool) -> None:
        """Create or adopt the folder (refusing one adapt-engine did not make); a fresh run clears old snapshots."""
        check_checkpoint_dir(self.folder)
        if fresh and self.folder.is_dir():
            self._remove_snapshots()
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / MARKER).is_file():
            atomic_write_json(self.folder / MARKER, {"written_by": "adapt-engine", "kind": "snapshots"})

    def path(self, name: str) -> Path:
        """Folder of snapshot ``name``."""
        return self.folder / name

    def write(self, model, tokenizer, name: str) -> Path:
        """Save ``model`` as snapshot ``name`` (replacing a stale one of a killed run)."""
        with quiet_transformers():
            return save_pruned(model, tokenizer, self.path(name), report=None)

    def delete(self, name: str) -> None:
        """Remove one snapshot folder."""
        shutil.rmtree(self.path(name), ignore_errors=True)

    def _remove_snapshots(self) -> None:
        for entry in self.folder.iterdir():
            if entry.name.startswith((SNAPSHOT_PREFIX, "." + SNAPSHOT_PREFIX)) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def remove(self) -> None:
        """Delete every snapshot, the marker, and the folder if that empties it."""
        if not self.folder.is_dir() or not (self.folder / MARKER).is_file():
            return
        self._remove_snapshots()
        (self.folder / MARKER).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:  # the user put other files there: keep them
            pass


class ResidentTeacher:
    """At most one teacher in memory: loading another frees the previous one first. Frozen, eval mode."""

    def __init__(self, store: SnapshotStore, device: str, dtype: torch.dtype):
        self.store, self.device, self.dtype = store, device, dtype
        self.name: str | None = None
        self.model: torch.nn.Module | None = None

    def get(self, name: str) -> torch.nn.Module:
        """The teacher ``name``, loaded from its snapshot unless it is the resident one."""
        if name != self.name:
            self.release()
            path = self.store.path(name)
            if not path.is_dir():
                raise SnapshotError(f"teacher snapshot {path} is missing (the run folder was edited); start over "
                                    f"without --resume")
            model = load_pruned(path, device=self.device, dtype=self.dtype)
            model.requires_grad_(False)
            model.eval()
            self.model, self.name = model, name
        return self.model

    def release(self) -> None:
        """Drop the resident teacher."""
        self.model, self.name = None, None
        gc.collect()
