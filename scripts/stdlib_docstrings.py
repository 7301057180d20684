"""Write English text for held-out scoring: docstrings of a fixed list of CPython stdlib modules.

None of it comes from ``pydoc_data.topics`` (the built-in calibration text), so a model calibrated on
the built-in train split is scored on text it never saw. Usage: python scripts/stdlib_docstrings.py OUT.txt
"""

import importlib
import inspect
import sys

MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "heapq", "http.client", "imaplib", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox",
    "multiprocessing", "optparse", "pathlib", "pickle", "pprint", "queue", "random", "shutil", "smtplib",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "zipfile",
)


def docstrings(name: str) -> list[str]:
    """The module's docstring and those of its public classes, functions and methods, in source order."""
    mod = importlib.import_module(name)
    out = [inspect.getdoc(mod) or ""]
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for m_name, m in sorted(vars(obj).items()):
                    if not m_name.startswith("_") and inspect.isfunction(m):
                        out.append(inspect.getdoc(m) or "")
    return [d.strip() for d in out if len(d.strip()) > 80]


def main(path: str) -> None:
    """Write the docstrings, blank-line separated, to ``path``."""
    docs = [d for name in MODULES for d in docstrings(name)]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(docs) + "\n")
    print(f"{len(docs)} docstrings, {sum(map(len, docs))} characters -> {path}")


if __name__ == "__main__":
    main(sys.argv[1])
