"""--uniform-shape outputs are standard models: stock config, no remote code, equal to our reload bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_model

from adapt_engine.adapters import DecoderAdapter, count_params
from adapt_engine.cli import main
from adapt_engine.groups import LayerKeep
from adapt_engine.models import load_model
from adapt_engine.pruner import AdaptPruner, PruneSettings
from adapt_engine.saving import PrunedModelError, load_pruned, save_pruned
from adapt_engine.surgery import apply_plan, prune_stem

pytestmark = pytest.mark.usefixtures("one_thread")

# A fresh interpreter: plain from_pretrained (no trust_remote_code) must build it, equal the expected logits bit for
# bit, and generate.
_FRESH = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
path, expected = sys.argv[1], load_file(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
with torch.no_grad():
    assert torch.equal(model(expected["ids"]).logits, expected["logits"]), "logits differ"
out = model.generate(expected["ids"][:1, :4], max_new_tokens=5, do_sample=False)
assert out.shape == (1, 9), out.shape
print("ok", type(model).__name__, model.config.model_type, model.config.hidden_size)
"""


def _uniform_pruned(family: str):
    model = make_tiny_model(family)
    prune_stem(DecoderAdapter(model), torch.arange(12, 48))  # a narrower hidden size whatever the ranking picks
    calib = torch.randint(0, 320, (8, 12), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(allocation="global", groups="heads,mlp,stem", uniform_shape=True, compensate="none",
                             steps=2, calib_batch_size=8)
    AdaptPruner(model, settings, calib).prune_to(int(count_params(model) * 0.55))
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_uniform_output_loads_without_remote_code_in_a_fresh_python(family, tmp_path, tiny_tokenizer):
    model = _uniform_pruned(family)
    assert model.config.hidden_size <= 36
    out = save_pruned(model, tiny_tokenizer, tmp_path / "std", standard=True)
    cfg = json.loads((out / "config.json").read_text())
    shape = DecoderAdapter(model).shapes()[0]
    assert cfg["model_type"] == family and "auto_map" not in cfg and "layer_num_attention_heads" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (
        shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
    assert not list(out.glob("*.py"))
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_pruned(out)(ids).logits
        assert torch.equal(ours, model(ids).logits)
        assert torch.equal(load_model(str(out))[0](ids).logits, ours)
    save_file({"ids": ids, "logits": ours}, str(tmp_path / "expected.safetensors"))
    done = subprocess.run([sys.executable, "-c", _FRESH, str(out), str(tmp_path / "expected.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:3] == ["ok", type(model).__name__, family]
    assert load_file(str(tmp_path / "expected.safetensors"))["logits"].shape == ours.shape


def test_standard_save_refuses_layers_of_different_shapes(tmp_path):
    model = make_tiny_model("llama")
    adapter = DecoderAdapter(model)
    apply_plan(adapter, [LayerKeep(mlp=torch.arange(40 + j)) for j in range(len(adapter.layers))])
    with pytest.raises(PrunedModelError, match="uniform-shape"):
        save_pruned(model, None, tmp_path / "x", standard=True)
    assert not (tmp_path / "x").exists()


def test_prune_cli_uniform_shape_writes_a_stock_model(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "u"
    argv = ["prune", "--model", str(tiny_model_dir), "--output", str(out), "--sparsity", "0.4", "--steps", "2",
            "--calib-samples", "8", "--calib-seq-len", "16", "--eval-tokens", "256", "--no-bench",
            "--allocation", "global", "--groups", "heads,mlp,stem", "--uniform-shape"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "hidden size" in printed and "removal order" in printed and "trust_remote_code" not in printed
    report = json.loads((out / "pruning_report.json").read_text())
    assert all(set(rec["removed_params"]) == {"heads", "mlp", "stem"} for rec in report["history"])
    assert (out / "pruning_report.png").stat().st_size > 1000
    assert report["hidden_size_after"] == json.loads((out / "config.json").read_text())["hidden_size"]
    model, _ = load_model(str(out))
    assert count_params(model) == report["params_after"]
    assert type(model).__name__ == "LlamaForCausalLM"


def test_accel_global_stem_uniform_shape(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "a"
    argv = ["accel", "--model", str(tiny_model_dir), "--output", str(out), "--sparsity", "0.4", "--interleaves", "2",
            "--train-tokens", str(24 * 16), "--seq-len", "16", "--global-batch", "8", "--micro-batch", "4",
            "--calib-samples", "8", "--calib-seq-len", "16", "--calib-batch-size", "4", "--val-tokens", "128",
            "--prune-steps", "1", "--no-bench", "--allocation", "global", "--groups", "heads,mlp,stem",
            "--uniform-shape", "--checkpoint-dir", str(tmp_path / "ck")]
    assert main(argv) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and report["hidden_size_after"] == cfg["hidden_size"]
    assert report["params_after"] >= report["target_params"]
    model, _ = load_model(str(out))
    assert count_params(model) == report["params_after"]
