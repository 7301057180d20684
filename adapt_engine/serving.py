"""The serving engines (vLLM, llama.cpp) live in their own virtualenvs; this runs requests through them.

``scripts/setup_serving.sh`` creates the virtualenvs under ``$ADAPT_ENGINE_SERVING_DIR`` (default
``~/.cache/adapt_engine/serving``). Each request runs a small standalone worker script
(``adapt_engine/serving_workers/``) with the engine's Python, JSON in and out, so the engines' pinned
torch/transformers never meet ours.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .errors import UsageError

ENGINES = {"vllm": ("vllm", "vllm_worker.py", "from vllm import LLM"),
           "llama.cpp": ("llama_cpp", "llama_cpp_worker.py", "import llama_cpp")}
SETUP_HINT = "bash scripts/setup_serving.sh"
WORKERS = Path(__file__).parent / "serving_workers"


class EngineError(RuntimeError):
    """A serving engine failed while running a request (its output is in the message)."""


def serving_dir() -> Path:
    """Where the engines' virtualenvs live."""
    return Path(os.environ.get("ADAPT_ENGINE_SERVING_DIR", Path.home() / ".cache" / "adapt_engine" / "serving"))


def engine_python(engine: str) -> Path | None:
    """The Python of ``engine``'s virtualenv, or None if it is not set up."""
    if engine not in ENGINES:
        raise UsageError(f"unknown serving engine '{engine}'; choose one of {', '.join(ENGINES)}")
    python = serving_dir() / ENGINES[engine][0] / "bin" / "python"
    return python if python.is_file() else None


def missing_engine_message(engine: str) -> str:
    """What to run to set ``engine`` up."""
    return f"serving engine {engine} is not set up in {serving_dir()}; run `{SETUP_HINT}`"


def run_engine(engine: str, request: dict, timeout: float = 1800.0) -> list[dict]:
    """Run ``request`` through ``engine``'s worker; returns its results (one per model)."""
    python = engine_python(engine)
    if python is None:
        raise UsageError(missing_engine_message(engine))
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("PYTHONPATH", None)  # the engine's own packages only
    proc = subprocess.run([str(python), str(WORKERS / ENGINES[engine][1])], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-40:])
        raise EngineError(f"{engine} worker failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])
