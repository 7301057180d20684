"""No import cycle inside the package: the module graph (top-level and function-level imports) is acyclic."""

from __future__ import annotations

import ast
from pathlib import Path

import adapt_engine

ROOT = Path(adapt_engine.__file__).parent
KERNELS = Path(adapt_engine.kernels.__file__).parent if hasattr(adapt_engine, "kernels") else None


def _modules() -> dict[str, Path]:
    import adapt_engine.kernels as kernels

    found = {}
    for base, prefix in ((ROOT, "adapt_engine"), (Path(kernels.__file__).parent, "adapt_engine.kernels")):
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([prefix, *parts])] = f
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        out |= {t for t in targets if t in known and t != name}
    return out


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle of concern
    graph = {n: {t for t in deps if not t.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
