"""scripts/make_random_model.py: a real architecture's layout, shard per layer, loadable by transformers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors import safe_open

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_random_model.py"
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
            vocab_size=320, bos_token_id=0, eos_token_id=1)


def _script():
    spec = importlib.util.spec_from_file_location("make_random_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_writes_a_loadable_sharded_model(tmp_path):
    from transformers import AutoModelForCausalLM

    make = _script()
    out = tmp_path / "m"
    summary = make.write_random_model(out, "llama-3.1-8b", layers=3, dtype="bfloat16", tokenizer=False,
                                      overrides=TINY)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 + 2  # embedding, one per layer, final norm + untied head
    with safe_open(str(out / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]), "pt") as f:
        assert set(f.keys()) == {k for k in index["weight_map"] if k.startswith("model.layers.1.")}
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    assert model.config.rope_scaling["rope_type"] == "llama3" or model.config.rope_parameters["rope_type"] == "llama3"
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.shape == (64, 64) and 0.01 < w.std().item() < 0.03
    assert torch.isfinite(model(torch.tensor([[0, 5, 7]])).logits).all()


def test_same_seed_same_weights(tmp_path):
    make = _script()
    for name in ("a", "b"):
        make.write_random_model(tmp_path / name, "llama-3.2-1b", layers=1, tokenizer=False, overrides=TINY, seed=3)
    for shard in sorted((tmp_path / "a").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fa, safe_open(str(tmp_path / "b" / shard.name), "pt") as fb:
            for key in fa.keys():
                assert torch.equal(fa.get_tensor(key), fb.get_tensor(key))
