"""A regular (non-editable) install ships every folder of Python files the package uses."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_packages() -> set[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return {elt.value for elt in node.value.elts}
    raise AssertionError("setup.py lists no packages")


def test_every_package_folder_is_listed_in_setup():
    found = {"adapt_engine." + ".".join(p.parent.relative_to(REPO / "adapt_engine").parts)
             for p in (REPO / "adapt_engine").rglob("*.py") if p.parent != REPO / "adapt_engine"}
    found = {name.rstrip(".") for name in found if "__pycache__" not in name}
    assert found <= _setup_packages(), f"add {sorted(found - _setup_packages())} to setup.py packages"
