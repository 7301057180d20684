#!/usr/bin/env bash
# Reproduces the issue-2 quality table on the built-in SmolLM2-135M: held-out perplexity of the dense
# model and of models pruned to 20 % / 40 % with adaptive vs uniform allocation and taylor vs magnitude
# saliency, plus each run's wall time and peak memory (from pruning_report.json).
# Usage: bash scripts/prune_table.sh [OUT_DIR] [extra prune flags...]
set -euo pipefail
OUT="${1:-out/table}"; shift || true
STEPS="${STEPS:-5}"; SAMPLES="${SAMPLES:-128}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
adapt-engine eval --seq-len 512 | sed 's/^{/{"run": "dense", /' >> "$RESULTS"
for S in 0.2 0.4; do
  for CFG in "adaptive taylor" "uniform taylor" "adaptive magnitude"; do
    ALLOC="${CFG% *}"; IMP="${CFG#* }"
    NAME="s${S}-${ALLOC}-${IMP}"
    adapt-engine prune --sparsity "$S" --allocation "$ALLOC" --importance "$IMP" \
      --steps "$STEPS" --calib-samples "$SAMPLES" --eval-tokens 0 --no-bench --overwrite \
      --output "$OUT/$NAME" "$@" > "$OUT/$NAME.log" 2> "$OUT/$NAME.err"
    adapt-engine eval --model "$OUT/$NAME" --seq-len 512 | \
      python -c "import json,sys; r=json.loads(sys.stdin.read()); p=json.load(open('$OUT/$NAME/pruning_report.json')); \
r.update(run='$NAME', wall_s=round(p['wall_seconds'],1), peak_rss_mb=round(p['peak_rss_mb'])); print(json.dumps(r))" >> "$RESULTS"
    tail -1 "$RESULTS"
  done
done
