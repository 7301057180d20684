"""Atomic writers, folder publication that never leaves the path empty, and output pre-flight checks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from adapt_engine import fsio
from adapt_engine.checkpoint import MARKER, CheckpointError, open_checkpoint_dir, remove_checkpoint_dir
from adapt_engine.errors import AdaptEngineError, OutputPathError


def test_atomic_write_follows_umask_and_replaces(tmp_path):
    target = tmp_path / "a.json"
    fsio.atomic_write_json(target, {"x": 1})
    fsio.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode == 0o666 & ~fsio.current_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_write_failure_keeps_old(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def boom(path):
        path.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        fsio.atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_publishes_and_overwrites(tmp_path):
    out = tmp_path / "out"
    with fsio.atomic_dir(out) as tmp:
        (tmp / "f").write_text("1")
    assert (out / "f").read_text() == "1" and fsio.written_by_us(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~fsio.current_umask()
    with pytest.raises(OutputPathError, match="not empty"):
        with fsio.atomic_dir(out) as tmp:
            (tmp / "f").write_text("2")
    with fsio.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "f").write_text("2")
    assert (out / "f").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fallback_crash_between_renames_is_recovered(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between moving the old folder aside and the new one in
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        fsio.publish_dir(new, out, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists()
    # the old folder's owner is this (live) process: pretend it died
    monkeypatch.setattr(fsio, "process_alive", lambda pid: False)
    fsio.recover_interrupted(out)
    assert (out / "f").read_text() == "old"


def test_preflight_refusals(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(OutputPathError, match="input"):
        fsio.preflight_output(model, overwrite=True, protect=[model])
    with pytest.raises(OutputPathError, match="input"):
        fsio.preflight_output(tmp_path, overwrite=True, protect=[model])
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(OutputPathError, match="existing file"):
        fsio.preflight_output(afile)
    with pytest.raises(OutputPathError, match="is a file"):
        fsio.preflight_output(afile / "sub" / "out")
    with pytest.raises(OutputPathError, match="not empty"):
        fsio.preflight_output(model)
    with pytest.raises(OutputPathError, match="did not write"):
        fsio.preflight_output(model, overwrite=True)
    monkeypatch.chdir(model)
    with pytest.raises(OutputPathError, match="current folder"):
        fsio.preflight_output(".", overwrite=True)
    with pytest.raises(OutputPathError, match="GiB free"):
        fsio.preflight_output(tmp_path / "new", need_bytes=1 << 60)
    assert fsio.preflight_output(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert issubclass(OutputPathError, AdaptEngineError)


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs sysfs")
def test_preflight_unwritable_location():
    with pytest.raises(OutputPathError, match="cannot be written"):
        fsio.preflight_output("/sys/adapt-engine-out")


def test_checkpoint_dir_refuses_foreign_folder_and_removes_only_ours(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not created by adapt-engine"):
        open_checkpoint_dir(foreign, resume=False)
    assert (foreign / "precious.txt").is_file()
    ours = open_checkpoint_dir(tmp_path / "ck", resume=False)
    (ours / "step-000000001").mkdir()
    (ours / "notes.txt").write_text("user file")
    remove_checkpoint_dir(ours)
    assert sorted(p.name for p in ours.iterdir()) == ["notes.txt"]
    ours2 = open_checkpoint_dir(tmp_path / "ck2", resume=False)
    (ours2 / "step-000000001").mkdir()
    remove_checkpoint_dir(ours2)
    assert not ours2.exists()
    assert not (tmp_path / "ck" / MARKER).exists()


def test_atomic_write_removes_temporaries_of_dead_writers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (tmp_path / f".a.json.tmp-{dead}-xyz").write_text("half")
    live = tmp_path / f".a.json.tmp-{os.getpid()}-abc"  # a write in progress in a live process stays
    live.write_text("busy")
    fsio.atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "a.json"]
