#!/usr/bin/env bash
# Issue-12 table: SmolLM2-135M dense and pruned at 20 % and 50 % (default target and --deploy-target vllm):
# held-out perplexity, and vLLM / llama.cpp speed ratios vs dense, each engine timing all five models in
# interleaved rounds. Set the engines up first: bash scripts/setup_serving.sh
# Usage: bash scripts/serving_table.sh OUT_DIR        (PRUNE_FLAGS overrides "--steps 5 --calib-samples 64")
set -euo pipefail
OUT="$1"
PY="${PY:-.venv/bin/python}"
PRUNE_FLAGS="${PRUNE_FLAGS:---steps 5 --calib-samples 64}"
mkdir -p "$OUT"
MODELS=()
for s in 0.2 0.5; do
  for target in hf vllm; do
    dir="$OUT/p${s#0.}-$target"
    [ -f "$dir/pruning_report.json" ] || "$PY" -m adapt_engine.cli prune --sparsity "$s" --deploy-target "$target" \
      $PRUNE_FLAGS --no-bench --output "$dir" --overwrite > "$dir.log" 2>&1
    MODELS+=("$dir")
  done
done
for engine in vllm llama.cpp; do
  [ -f "$OUT/bench-$engine/bench_engine.json" ] || "$PY" -m adapt_engine.cli bench --engine "$engine" \
    --compare "${MODELS[@]}" --prompt-lens 128 --new-tokens 32 --repeats 3 --concurrency 1,8 \
    --output "$OUT/bench-$engine" > "$OUT/bench-$engine.log" 2>&1
done
"$PY" - "$OUT" "${MODELS[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
out, models = Path(sys.argv[1]), [Path(m) for m in sys.argv[2:]]
bench = {e: json.loads((out / f"bench-{e}" / "bench_engine.json").read_text())["summary"] for e in ("vllm", "llama.cpp")}
first = json.loads((models[0] / "pruning_report.json").read_text())
print("| model | params | held-out ppl | vLLM TPOT × | vLLM tok/s ×1 / ×8 | llama.cpp TTFT × | llama.cpp TPOT × |")
print("| --- | --- | --- | --- | --- | --- | --- |")
def row(name, params, ppl):
    v, c = bench["vllm"][name], bench["llama.cpp"][name]
    t = v["throughput_ratio"]
    print(f"| {name} | {params / 1e6:.2f} M | {ppl:.3f} | {v.get('tpot_speedup', float('nan')):.2f} | "
          f"{t['1']:.2f} / {t['8']:.2f} | {c['ttft_speedup']:.2f} | {c['tpot_speedup']:.2f} |")
row("dense", first["params_before"], first["ppl_before"])
for m in models:
    r = json.loads((m / "pruning_report.json").read_text())
    row(m.name, r["params_after"], r["ppl_after"])
PYEOF
