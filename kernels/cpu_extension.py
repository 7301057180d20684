"""Just-in-time build and loading of the C++ CPU kernels in csrc/ (cached, built once per machine).

Build lock: torch's extension builder marks a build in progress with a ``lock`` file in the build folder
and waits, forever and silently, while that file exists, so a build killed with ``kill -9`` would hang
every later run. Around torch's build this module holds its own ``flock`` on ``adapt_engine.build.lock``
in the same folder; the kernel drops a flock when its owner dies. Holding the flock therefore proves
that no live adapt-engine process is building there, and a ``lock`` file found then is stale and is
removed. While a live process holds the flock, a caller waits at most ``BUILD_WAIT_SECONDS`` and then
fails with a message naming the lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.resources
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from adapt_engine.errors import AdaptEngineError  # absolute: this folder is also importable as `kernels`

DISABLE_ENV = "ADAPT_ENGINE_DISABLE_CPP"
EXTENSION_NAME = "adapt_engine_cpu_kernels"
SOURCES = ("registration.cpp", "saliency.cpp", "gather.cpp")
OPS_NAMESPACE = "adapt_engine_kernels"
HEADERS = ("ops.h",)
TORCH_LOCK = "lock"  # torch.utils.cpp_extension's marker of a build in progress
OWN_LOCK = "adapt_engine.build.lock"
BUILD_WAIT_SECONDS = 600.0  # a cold build takes about a minute on two busy cores

_lock = threading.Lock()
_module: Any = None
_error: CppBuildError | None = None


class CppBuildError(AdaptEngineError, RuntimeError):
    """The C++ CPU kernels could not be compiled or loaded."""


def cpp_disabled() -> bool:
    """True when ADAPT_ENGINE_DISABLE_CPP=1 asks for the torch reference path on CPU."""
    value = os.environ.get(DISABLE_ENV)  # checked on every kernel call: keep the unset case cheap
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def source_dir() -> Path:
    """Directory holding the C++ sources (the adapt_engine.csrc package)."""
    return Path(str(importlib.resources.files("adapt_engine.csrc")))


def _cpu_fingerprint() -> str:
    # -march=native binaries must not be reused on another CPU sharing the same home directory.
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_directory() -> Path:
    """Cache folder of the compiled extension: $TORCH_EXTENSIONS_DIR or ~/.cache/adapt_engine."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "adapt_engine" / "torch_extensions"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}_{_cpu_fingerprint()}"
    return base / f"{EXTENSION_NAME}_{tag.replace('+', '_')}"


def _compile_flags() -> tuple[list[str], list[str]]:
    cflags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        cflags.append("-march=native")
    # -fopenmp makes at::parallel_for use torch's OpenMP pool (same libgomp soname, loaded once).
    return cflags, ["-fopenmp"]


@contextlib.contextmanager
def build_lock(build_dir: Path, wait_seconds: float | None = None) -> Iterator[None]:
    """Hold the build folder's flock (waiting at most ``wait_seconds`` for a live builder); drop a stale torch lock."""
    wait = BUILD_WAIT_SECONDS if wait_seconds is None else wait_seconds
    own = build_dir / OWN_LOCK
    fd = os.open(own, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CppBuildError(
                        f"another process has been building the adapt-engine C++ kernels in {build_dir} for over "
                        f"{wait:.0f} s (it holds {own}). Wait for it to finish, or stop it; or set {DISABLE_ENV}=1 "
                        f"to use the plain-torch path on CPU"
                    ) from None
                if not told:
                    print(f"waiting for another process building the C++ kernels (lock {own}) ...", file=sys.stderr)
                    told = True
                time.sleep(0.2)
        stale = build_dir / TORCH_LOCK
        if stale.exists():  # we hold the flock, so its builder is dead: torch would wait for it forever
            print(f"removing {stale}, left by a C++ kernel build that was killed; rebuilding", file=sys.stderr)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


def _build(src: Path, name: str, build_dir: Path) -> Any:
    from torch.utils.cpp_extension import load  # imports setuptools: ~0.3 s, only needed when building

    missing = [f for f in SOURCES + HEADERS if not (src / f).is_file()]
    if missing:
        raise CppBuildError(f"C++ sources missing from {src}: {missing}; reinstall adapt-engine")
    build_dir.mkdir(parents=True, exist_ok=True)
    cflags, ldflags = _compile_flags()
    with build_lock(build_dir):
        # Registered as torch ops rather than a pybind11 module: the build takes seconds, not minutes.
        load(
            name=name,
            sources=[str(src / f) for f in SOURCES],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            verbose=False,
            is_python_module=False,
        )
    return getattr(torch.ops, OPS_NAMESPACE)


def load_cpu_kernels(src: Path | None = None, build_dir: Path | None = None) -> Any:
    """The CPU kernel ops namespace (built on first call), or None when ADAPT_ENGINE_DISABLE_CPP=1."""
    global _module, _error
    if cpp_disabled():
        return None
    custom = src is not None or build_dir is not None
    if not custom:
        if _module is not None:
            return _module
        if _error is not None:
            raise _error
    with _lock:
        if not custom and _module is not None:
            return _module
        try:
            # Other sources get their own name: torch versions builds by name within a process, and sharing it
            # would make the next build of the real sources a "_v1" that ignores the cached one.
            name = EXTENSION_NAME if src is None else f"{EXTENSION_NAME}_custom"
            module = _build(src or source_dir(), name, build_dir or build_directory())
        except CppBuildError as exc:
            err = exc
        except Exception as exc:  # compiler/ninja/loader failures arrive as assorted exception types
            err = CppBuildError(
                f"building the adapt-engine C++ CPU kernels failed: {exc}\n"
                "Fix: install a C++17 compiler with OpenMP (g++) and ninja, or set "
                f"{DISABLE_ENV}=1 to use the slower plain-torch path on CPU."
            )
            err.__cause__ = exc
        else:
            if not custom:
                _module = module
            return module
        if not custom:
            _error = err
        raise err
