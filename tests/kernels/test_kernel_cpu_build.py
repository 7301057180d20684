"""The just-in-time C++ build: source lookup, cache folder, disable switch, clear build errors."""

from __future__ import annotations

import pytest
from adapt_engine.kernels import CppBuildError
from adapt_engine.kernels.cpu_extension import (
    HEADERS,
    SOURCES,
    build_directory,
    load_cpu_kernels,
    source_dir,
)


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
