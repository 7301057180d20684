"""Checkpoints: exact trainer-state round trip, no unpickling of forged files, and a complete checkpoint
pointed to by latest.json at every instant of a crash."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import stat

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine import checkpoint as ck
from adapt_engine import fsio
from adapt_engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from adapt_engine.errors import AdaptEngineError


@pytest.fixture
def model_and_tok(tiny_tokenizer):
    return make_tiny_model("llama", vocab=len(tiny_tokenizer), layers=2), tiny_tokenizer


def _state(step: int) -> dict:
    return {"position": {"global_step": step, "phase": step}, "rng": [rng_state()], "lr": (1e-3, None)}


class _Payload:
    """Unpickling this runs a command (what a forged checkpoint would do)."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def _plant(ckpt, rel: str, data: bytes, format_version: int | None = None) -> None:
    """Write a file into a checkpoint and update meta.json's hash, as a tamperer would."""
    (ckpt / rel).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][rel] = hashlib.sha256(data).hexdigest()
    if format_version is not None:
        meta["format_version"] = format_version
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_round_trip_restores_state_and_rngs(tmp_path, model_and_tok):
    model, tok = model_and_tok
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = _state(5)
    path = save_checkpoint(tmp_path, 5, model, tok, state)
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    assert latest_checkpoint(tmp_path) == path
    loaded_model, loaded = load_checkpoint(path)
    assert loaded["position"] == state["position"] and loaded["lr"] == (1e-3, None)
    set_rng_state(loaded["rng"][0])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
    for (name, a), b in zip(model.state_dict().items(), loaded_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.bin"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~fsio.current_umask()  # not mkdtemp's 0700


@pytest.mark.parametrize("format_version", [None, 1])
def test_forged_pickle_in_a_checkpoint_is_never_run(tmp_path, model_and_tok, format_version):
    model, tok = model_and_tok
    path = save_checkpoint(tmp_path / "ck", 1, model, tok, _state(1))
    flag = tmp_path / "pwned"
    _plant(path, "trainer.pt", pickle.dumps(_Payload(flag)), format_version)
    with pytest.raises(CheckpointError, match="never loads") as info:
        load_checkpoint(path)
    assert isinstance(info.value, AdaptEngineError)
    assert not flag.exists()


def test_forged_pickle_beside_the_weights_is_never_run(tmp_path, model_and_tok):
    model, tok = model_and_tok
    path = save_checkpoint(tmp_path / "ck", 1, model, tok, _state(1))
    flag = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(flag))
    _plant(path, "model/pytorch_model.bin", blob)
    _plant(path, "trainer.safetensors", blob)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)
    assert not flag.exists()


def test_pointer_outside_the_folder_is_refused(tmp_path, model_and_tok):
    model, tok = model_and_tok
    save_checkpoint(tmp_path / "ck", 1, model, tok, _state(1))
    (tmp_path / "ck" / "latest.json").write_text(json.dumps({"checkpoint": "../elsewhere", "step": 1}))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(CheckpointError, match="latest.json"):
        latest_checkpoint(tmp_path / "ck")


class _Crash(BaseException):
    """A simulated kill -9: raised at one file-system operation, and at every one after it."""


def _crash_at(monkeypatch, n: int) -> dict:
    """Make the n-th rename/replace/remove/fsync (counted across them) and all later ones raise _Crash."""
    calls = {"n": 0}

    def wrap(real):
        def op(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= n:
                raise _Crash
            return real(*args, **kwargs)
        return op

    for mod, name in ((os, "rename"), (os, "replace"), (os, "unlink"), (os, "fsync"), (shutil, "rmtree")):
        monkeypatch.setattr(mod, name, wrap(getattr(mod, name)))
    return calls


def _assert_latest_complete(directory, allowed_steps) -> None:
    latest = latest_checkpoint(directory)
    assert latest is not None
    meta = verify_checkpoint(latest)
    assert meta["step"] in allowed_steps
    assert ck.load_trainer_state(latest)["position"]["global_step"] == meta["step"]


def _fake_save_pruned(model, tokenizer, folder, report=None):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")  # the real save is tested above; it is slow


def test_same_step_checkpoint_never_loses_the_previous_one(tmp_path, monkeypatch):
    """Two checkpoints of one step (a phase without training windows): a kill at any file-system operation
    of the second save leaves latest.json naming a complete checkpoint, and the next save recovers."""
    monkeypatch.setattr(ck, "save_pruned", _fake_save_pruned)
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # still a crash point below; a real flush is slow
    model = tok = None
    n, finished = 1, False
    while not finished:
        directory = tmp_path / f"run{n}"
        save_checkpoint(directory, 3, model, tok, _state(3))
        with pytest.MonkeyPatch.context() as mp:
            calls = _crash_at(mp, n)
            try:
                save_checkpoint(directory, 3, model, tok, _state(3))
                finished = True
            except _Crash:
                pass
        _assert_latest_complete(directory, {3})
        with pytest.MonkeyPatch.context() as mp:  # the run continues in a new process: the old pid is dead
            mp.setattr(fsio, "process_alive", lambda pid: False)
            save_checkpoint(directory, 4, model, tok, _state(4))
        _assert_latest_complete(directory, {4})
        left = sorted(p.name for p in directory.iterdir())
        assert left == [".adapt-engine-checkpoints", "latest.json", "step-000000004"] or \
            left == ["latest.json", "step-000000004"], left
        n += 1
        assert n < 200, f"save_checkpoint did {calls['n']} operations"
    assert n > 5  # the crash points really covered the save


def test_keep_retains_the_newest(tmp_path, model_and_tok):
    model, tok = model_and_tok
    for step in (1, 2, 2, 3):
        save_checkpoint(tmp_path, step, model, tok, _state(step), keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000002.1", "step-000000003"]
    assert latest_checkpoint(tmp_path).name == "step-000000003"


def test_checkpoint_tokenizer_loads_without_the_model_type_warning(tmp_path, model_and_tok, capfd):
    model, tok = model_and_tok
    path = save_checkpoint(tmp_path, 1, model, tok, _state(1))
    capfd.readouterr()
    loaded = ck.load_checkpoint_tokenizer(path)
    assert loaded("hello world")["input_ids"] == tok("hello world")["input_ids"]
    assert "to instantiate a model of type" not in capfd.readouterr().err


def test_index_naming_files_outside_the_checkpoint_is_refused(tmp_path, model_and_tok):
    model, tok = model_and_tok
    path = save_checkpoint(tmp_path / "ck", 1, model, tok, _state(1))
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["../../outside"] = "0" * 64
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        verify_checkpoint(path)
