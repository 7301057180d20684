"""The just-in-time C++ build: source lookup, cache folder, disable switch, clear build errors, and no hang
after a build killed mid-way."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adapt_engine.kernels import CppBuildError, cpu_extension
from adapt_engine.kernels.cpu_extension import (
    HEADERS,
    OWN_LOCK,
    SOURCES,
    build_directory,
    load_cpu_kernels,
    source_dir,
)

from adapt_engine.errors import AdaptEngineError


def test_sources_ship_with_the_package():
    src = source_dir()
    for name in SOURCES + HEADERS:
        assert (src / name).is_file()


def test_cache_folder_honours_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_directory().parent == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert ".cache" in build_directory().parts


def test_disable_switch_returns_none(monkeypatch):
    monkeypatch.setenv("ADAPT_ENGINE_DISABLE_CPP", "1")
    assert load_cpu_kernels() is None


def test_build_failure_raises_a_clear_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES + HEADERS:
        (src / name).write_text("this is not C++;\n")
    with pytest.raises(CppBuildError, match="ADAPT_ENGINE_DISABLE_CPP=1"):
        load_cpu_kernels(src=src, build_dir=tmp_path / "build")


def test_missing_sources_raise_a_clear_error(tmp_path):
    with pytest.raises(CppBuildError, match="sources missing"):
        load_cpu_kernels(src=tmp_path, build_dir=tmp_path / "build")


def test_builds_and_registers_ops():
    ops = load_cpu_kernels()
    if ops is None:
        pytest.skip("ADAPT_ENGINE_DISABLE_CPP=1")
    assert ops.gather_temp_budget_bytes() > 0


# ---------------------------------------------------------------------------------------------------------
# A build killed with kill -9 must not hang later runs (torch waits forever on its leftover lock file)
# ---------------------------------------------------------------------------------------------------------

_LOAD = """
import sys, time
from pathlib import Path
from adapt_engine.kernels.cpu_extension import load_cpu_kernels
t = time.monotonic()
ops = load_cpu_kernels(build_dir=Path(sys.argv[1]))
assert ops.gather_temp_budget_bytes() > 0
print(f"loaded in {time.monotonic() - t:.1f} s")
"""

# Holds both locks like a real build in progress: torch's compile step is replaced by a long sleep.
_STUCK_BUILD = """
import sys, time
import torch.utils.cpp_extension as ext
from pathlib import Path
from adapt_engine.kernels.cpu_extension import load_cpu_kernels

def compiling(*args, **kwargs):
    print("compiling", flush=True)
    time.sleep(600)

ext._write_ninja_file_and_build_library = compiling
load_cpu_kernels(build_dir=Path(sys.argv[1]))
"""


def _built_copy(tmp_path: Path) -> Path:
    """A copy of the built extension folder (so that loading it is quick once the lock is handled)."""
    if load_cpu_kernels() is None:
        pytest.skip("ADAPT_ENGINE_DISABLE_CPP=1")
    copy = tmp_path / "build"
    shutil.copytree(build_directory(), copy, ignore=shutil.ignore_patterns("lock", OWN_LOCK))
    return copy


def _run(script: str, build_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ADAPT_ENGINE_DISABLE_CPP"}
    return subprocess.run([sys.executable, "-c", script, str(build_dir)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_stale_torch_lock_file_is_removed(tmp_path):
    build = _built_copy(tmp_path)
    (build / "lock").touch()  # what a build killed inside torch's builder leaves
    proc = _run(_LOAD, build)
    assert proc.returncode == 0, proc.stderr
    assert "killed" in proc.stderr and not (build / "lock").exists()


def test_build_killed_mid_way_does_not_hang_the_next_run(tmp_path):
    build = _built_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "ADAPT_ENGINE_DISABLE_CPP"}
    stuck = subprocess.Popen([sys.executable, "-c", _STUCK_BUILD, str(build)], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert stuck.stdout.readline().strip() == "compiling"
        assert (build / "lock").exists()
    finally:
        stuck.send_signal(signal.SIGKILL)
        stuck.wait()
    proc = _run(_LOAD, build)
    assert proc.returncode == 0, proc.stderr


def test_live_builder_makes_a_bounded_wait_naming_the_lock(tmp_path, monkeypatch):
    build = tmp_path / "build"
    build.mkdir()
    with open(build / OWN_LOCK, "w") as holder:  # a live process building here
        fcntl.flock(holder, fcntl.LOCK_EX)
        monkeypatch.setattr(cpu_extension, "BUILD_WAIT_SECONDS", 0.5)
        start = time.monotonic()
        with pytest.raises(CppBuildError, match=OWN_LOCK) as info:
            load_cpu_kernels(build_dir=build)
        assert time.monotonic() - start < 10
    assert isinstance(info.value, AdaptEngineError) and isinstance(info.value, RuntimeError)
