"""Compare the --kv-merge rules on SmolLM2 in one shot: merge every KV group of the chosen layers into one
(3 -> 1 KV heads, all 9 query heads kept, as --deploy-target vllm does), with the Taylor KV saliency of 32
calibration windows of 64 tokens, and print the held-out perplexity over 4,096 tokens for each rule.

    .venv/bin/python scripts/compare_kv_merge.py
"""

from __future__ import annotations

import copy
import json

import torch

from adapt_engine.adapters import DecoderAdapter, LayerShape
from adapt_engine.commands import heldout_ids
from adapt_engine.data import load_text, sample_windows, tokenize_text
from adapt_engine.evaluate import perplexity
from adapt_engine.groups import KV_MERGES, MERGE, attention_keep
from adapt_engine.importance import calibration_pass
from adapt_engine.models import load_model
from adapt_engine.surgery import apply_plan

LAYER_SETS = {"odd layers": range(1, 30, 2), "layers 1-29": range(1, 30)}


def main() -> None:
    """Print one JSON line per rule and layer set, and the dense perplexity first."""
    torch.manual_seed(0)
    model, tok = load_model(None)
    calib = sample_windows(tokenize_text(tok, load_text(None, "train")), 32, 64, seed=0)
    _, scores, _ = calibration_pass(DecoderAdapter(model), calib, 32, None, "taylor", micro_batch_size=8)
    held_out = heldout_ids(tok, None, None)[:4096]
    print(json.dumps({"dense": perplexity(model, held_out, seq_len=512, batch_size=4)["ppl"]}), flush=True)
    for name, layers in LAYER_SETS.items():
        for how in KV_MERGES:
            merged = copy.deepcopy(model)
            adapter = DecoderAdapter(merged)
            plan = []
            for j, s in enumerate(adapter.shapes()):
                new = LayerShape(s.num_heads, 1 if j in layers else s.num_kv_heads, s.intermediate_size)
                plan.append(attention_keep(scores.q_heads[j], scores.kv_heads[j], s, new, MERGE, how))
            apply_plan(adapter, plan)
            ppl = perplexity(merged, held_out, seq_len=512, batch_size=4)["ppl"]
            print(json.dumps({"layers": name, "kv_merge": how, "ppl": ppl}), flush=True)


if __name__ == "__main__":
    main()
