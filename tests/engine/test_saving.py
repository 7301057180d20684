"""Save → reload with adapt_engine.load_pruned and with stock transformers (trust_remote_code)."""

import json
import stat
import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILY_CASES, make_tiny_model
from transformers import AutoModelForCausalLM

from adapt_engine import fsio
from adapt_engine.adapters import DecoderAdapter, LayerShape, UnsupportedModelError
from adapt_engine.errors import AdaptEngineError
from adapt_engine.groups import attention_keep
from adapt_engine.pruner import AdaptPruner, PruneSettings
from adapt_engine.remote.adapt_pruned_shapes import NoAttention
from adapt_engine.saving import PrunedModelError, load_pruned, save_pruned
from adapt_engine.surgery import apply_plan


def _pruned(family="llama", gqa=True, mode="query"):
    model = make_tiny_model(family, gqa)
    calib = torch.randint(0, 320, (4, 10), generator=torch.Generator().manual_seed(0))
    pruner = AdaptPruner(model, PruneSettings(steps=2, attention=mode), calib)
    pruner.prune_to(pruner.target_from_sparsity(0.45))
    return model


def _reloads_exactly(model, out):
    """Both loaders give ``model``'s logits bit for bit; returns our loader's model."""
    x = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        ref = model(x).logits
        ours = load_pruned(out)
        stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert torch.equal(ours(x).logits, ref)
        assert torch.equal(stock(x).logits, ref)
    return ours


@pytest.mark.parametrize("family,gqa", FAMILY_CASES)
def test_roundtrip_both_loaders(tmp_path, tiny_tokenizer, family, gqa):
    model = _pruned(family, gqa, mode="kv" if family == "qwen3" else "query")
    out = save_pruned(model, tiny_tokenizer, tmp_path / "out", {"note": "test"})
    _reloads_exactly(model, out)
    cfg = json.loads((out / "config.json").read_text())
    assert len(cfg["layer_intermediate_sizes"]) == 3 and "quantization_config" not in cfg
    assert (out / "pruning_report.json").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out.tmp-*"))  # no temporary left behind


@pytest.mark.parametrize("family", ["llama", "llama-bias", "qwen2", "gemma2"])
def test_roundtrip_of_a_layer_without_attention(tmp_path, tiny_tokenizer, family):
    model = make_tiny_model(family, True)
    adapter = DecoderAdapter(model)
    shapes = adapter.shapes()
    targets = [LayerShape(6, 1, 80), LayerShape(0, 0, 80), LayerShape(6, 2, 80)]
    apply_plan(adapter, [attention_keep(torch.rand(6), torch.rand(2), s, t, "merge") for s, t in zip(shapes, targets)])
    out = save_pruned(model, tiny_tokenizer, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_num_attention_heads"] == [6, 0, 6] and cfg["layer_num_key_value_heads"] == [1, 0, 2]
    ours = _reloads_exactly(model, out)
    assert isinstance(ours.model.layers[1].self_attn, NoAttention)
    # one of the two zero, or an MLP of 0, is damage, not a layer without attention
    for key, i, value in (("layer_num_key_value_heads", 0, 0), ("layer_num_attention_heads", 1, 6),
                          ("layer_intermediate_sizes", 2, 0)):
        bad = json.loads(json.dumps(cfg))
        bad[key][i] = value
        (out / "config.json").write_text(json.dumps(bad))
        with pytest.raises(PrunedModelError, match="damaged"):
            load_pruned(out)


def test_missing_and_corrupt_files_get_clear_errors(tmp_path, tiny_tokenizer):
    out = save_pruned(_pruned(), tiny_tokenizer, tmp_path / "m")
    with pytest.raises(PrunedModelError, match="not a directory"):
        load_pruned(tmp_path / "nope")
    weights = next(out.glob("*.safetensors"))
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(PrunedModelError, match="corrupt or truncated|lacks weights"):
        load_pruned(out)
    weights.unlink()
    with pytest.raises(PrunedModelError, match="no .safetensors"):
        load_pruned(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(PrunedModelError, match="corrupt"):
        load_pruned(out)


def test_mismatched_config_and_weights(tmp_path, tiny_tokenizer):
    out = save_pruned(_pruned(), tiny_tokenizer, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["layer_intermediate_sizes"][0] += 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PrunedModelError, match="different prunings"):
        load_pruned(out)
    cfg["adapt_base_model_type"] = "gpt2"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="supported"):
        load_pruned(out)


def test_stock_loading_without_remote_code_fails_loudly(tmp_path, tiny_tokenizer):
    out = save_pruned(_pruned(), tiny_tokenizer, tmp_path / "m")
    with pytest.raises(Exception, match="trust_remote_code|adapt_pruned"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_overwrite_is_atomic_and_keeps_the_old_model_on_failure(tmp_path, tiny_tokenizer, monkeypatch):
    out = save_pruned(make_tiny_model("llama", layers=3), tiny_tokenizer, tmp_path / "m")
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~fsio.current_umask()  # not mkdtemp's 0700
    before = (out / "config.json").read_text()

    class Killed(BaseException):
        pass

    def dies(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(type(tiny_tokenizer), "save_pretrained", dies)
    with pytest.raises(Killed):
        save_pruned(make_tiny_model("llama", layers=2), tiny_tokenizer, out)
    assert (out / "config.json").read_text() == before  # the old output is intact
    monkeypatch.undo()
    save_pruned(make_tiny_model("llama", layers=2), tiny_tokenizer, out)
    assert len(json.loads((out / "config.json").read_text())["layer_intermediate_sizes"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_leftovers_of_a_killed_save_are_removed(tmp_path, tiny_tokenizer):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    leftover = tmp_path / f".m.tmp-{dead}-abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    save_pruned(make_tiny_model("llama", layers=3), tiny_tokenizer, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path, tiny_tokenizer):
    mine = tmp_path / "docs"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(PrunedModelError, match="did not write") as info:
        save_pruned(make_tiny_model("llama", layers=3), tiny_tokenizer, mine)
    assert isinstance(info.value, AdaptEngineError)
    assert (mine / "thesis.tex").read_text() == "years of work"
