"""The source folder kernels/ never stands in for Hugging Face's ``kernels`` package when a checkout's root is on
sys.path (``python -m`` run from it): transformers imports that package by name."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import adapt_engine.kernels
import pytest

CHECKOUT = Path(adapt_engine.kernels.__file__).resolve().parent.parent


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run_in_checkout(code: str) -> subprocess.CompletedProcess:
    # -c puts the working directory first on sys.path, as `python -m pytest` run from the checkout does
    return subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not _installed("kernels"), reason="Hugging Face's kernels package is not installed")
def test_top_level_kernels_is_the_installed_distribution_even_from_the_checkout():
    done = _run_in_checkout(
        "import kernels, adapt_engine.kernels as ours\n"
        "print(kernels.__file__)\nprint(ours.__file__)\nprint(hasattr(kernels, 'linear_cross_entropy'))")
    assert done.returncode == 0, done.stderr
    theirs, ours, has_ours = done.stdout.split()
    assert Path(theirs).resolve().parent != CHECKOUT / "kernels"
    assert Path(ours).resolve() == CHECKOUT / "kernels" / "__init__.py"
    assert has_ours == "False"


def test_without_the_distribution_the_folder_still_imports_as_top_level_kernels():
    # Older transformers import any top-level "kernels" to probe its version: it must not raise. The child hides
    # every other folder holding a "kernels" package (torch, which ours needs, is imported before).
    done = _run_in_checkout(
        "import os, sys, torch\n"
        "sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) == os.getcwd()\n"
        "               or not os.path.isdir(os.path.join(p, 'kernels'))]\n"
        "import kernels\nprint(hasattr(kernels, 'linear_cross_entropy'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]


def test_transformers_hub_kernels_imports_from_the_checkout():
    pytest.importorskip("transformers")
    done = _run_in_checkout("import transformers.integrations.hub_kernels")
    assert done.returncode == 0, done.stderr
