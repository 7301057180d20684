"""`adapt-engine export` without the serving engines: layouts, metadata, transformers reload, refusals."""

import json

import pytest
import torch
from safetensors import safe_open
from serving_models import make_serving_model, merge_shrink, shrink, vllm_target_model
from tiny_models import make_tiny_model

from adapt_engine.adapters import DecoderAdapter
from adapt_engine.cli import main
from adapt_engine.errors import UsageError
from adapt_engine.export import export_model
from adapt_engine.export_gguf import rope_rows_to_pairs
from adapt_engine.export_layout import ServingLayer, padded_head_count, serving_layers
from adapt_engine.saving import save_pruned

# layer 0 keeps one query head per KV group, layer 1 lost a whole KV group (--attention kv), layer 2 has an odd
# MLP width and all its heads.
MIXED_PLAN = [([0, 4], None, 37), ([0, 1, 2], [0], 128), (None, None, 53)]


@pytest.fixture
def pruned_dir(tmp_path, tiny_tokenizer):
    model = shrink(make_serving_model(), MIXED_PLAN)
    return save_pruned(model, tiny_tokenizer, tmp_path / "pruned")


def test_padded_head_count_divides_every_layer():
    layers = [ServingLayer(9, 3, 10), ServingLayer(6, 3, 10), ServingLayer(6, 2, 10)]
    assert padded_head_count(layers) == 12  # >= 9 and a multiple of lcm(3, 2)
    assert padded_head_count([ServingLayer(3, 3, 1), ServingLayer(6, 3, 1)]) == 6  # may be below the original


def test_rope_rows_to_pairs_interleaves_each_heads_halves():
    rows = torch.arange(8).float()[:, None]  # 2 heads of head_dim 4: halves (0,1 | 2,3) and (4,5 | 6,7)
    assert rope_rows_to_pairs(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_vllm_export_reloads_in_transformers_with_equal_logits(pruned_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from adapt_engine.models import load_model

    model, tok = load_model(str(pruned_dir))
    report = export_model(model, tok, "vllm", tmp_path / "deci")
    assert report["num_attention_heads"] == 6 and report["padding"]["padded_query_heads"] == 4 + 3
    cfg = json.loads((tmp_path / "deci" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas"
    assert [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == [3, 6, 3]
    assert [b["ffn"]["intermediate_size"] for b in cfg["block_configs"]] == [37, 128, 53]
    deci = AutoModelForCausalLM.from_pretrained(tmp_path / "deci", trust_remote_code=True, dtype=torch.float32)
    ids = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(ids).logits, deci.eval()(ids).logits
    assert torch.allclose(ref, out, atol=1e-5, rtol=0)


def test_vllm_export_keeps_qkv_biases_without_an_o_bias(tmp_path):
    from transformers import AutoModelForCausalLM

    model = shrink(make_serving_model("qwen2"), MIXED_PLAN)
    export_model(model, None, "vllm", tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["qkv_bias"] is True and cfg["attention_bias"] is False
    deci = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True, dtype=torch.float32)
    ids = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, deci.eval()(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,file_type", [("float32", 0), ("float16", 1), ("bfloat16", 32)])
def test_gguf_has_per_layer_shapes(pruned_dir, tmp_path, dtype, file_type):
    import gguf

    from adapt_engine.models import load_model

    model, tok = load_model(str(pruned_dir))
    export_model(model, tok, "gguf", tmp_path / "g", dtype=dtype)
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    field = {k: f.contents() for k, f in reader.fields.items()}
    assert field["general.architecture"] == "deci"
    assert field["general.file_type"] == file_type
    assert field["deci.attention.head_count"] == [2, 3, 6]
    assert field["deci.attention.head_count_kv"] == [2, 1, 2]
    assert field["deci.feed_forward_length"] == [37, 128, 53]
    assert field["deci.attention.key_length"] == 32
    assert len(field["tokenizer.ggml.tokens"]) == 320 and field["tokenizer.ggml.pre"] == "gpt-2"
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight"] == (96, 2 * 32)  # GGUF lists dimensions innermost first
    assert shapes["blk.1.attn_k.weight"] == (96, 32)
    assert shapes["blk.2.ffn_down.weight"] == (53, 96)
    q = model.model.layers[0].self_attn.q_proj.weight
    stored = [t for t in reader.tensors if t.name == "blk.0.attn_q.weight"][0]
    if dtype == "float32":
        assert torch.equal(torch.from_numpy(stored.data.copy()).reshape(q.shape), rope_rows_to_pairs(q, 2))


def test_unsupported_family_is_refused_with_the_reason(tmp_path):
    with pytest.raises(UsageError, match="q/k RMSNorm"):
        export_model(make_tiny_model("qwen3"), None, "vllm", tmp_path / "x")
    with pytest.raises(UsageError, match="multipliers"):
        export_model(make_tiny_model("granite"), None, "gguf", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_gguf_needs_a_tokenizer(tmp_path):
    with pytest.raises(UsageError, match="tokenizer"):
        export_model(make_serving_model(), None, "gguf", tmp_path / "g")


def test_cli_export_writes_once_and_refuses_to_clobber(pruned_dir, tmp_path, capsys):
    out = tmp_path / "served"
    assert main(["export", "--model", str(pruned_dir), "--format", "vllm", "--output", str(out)]) == 0
    assert "zero heads added" in capsys.readouterr().out
    assert json.loads((out / "export_report.json").read_text())["format"] == "vllm"
    assert main(["export", "--model", str(pruned_dir), "--format", "gguf", "--output", str(out)]) == 2
    assert main(["export", "--model", str(pruned_dir), "--format", "gguf", "--output", str(out),
                 "--overwrite"]) == 0
    assert (out / "model.gguf").is_file() and not (out / "model.safetensors").exists()


def test_vllm_target_prune_exports_without_padding(tmp_path, tiny_tokenizer):
    import gguf
    from transformers import AutoModelForCausalLM

    model = vllm_target_model()
    shapes = [(s.heads, s.kv_heads) for s in serving_layers(DecoderAdapter(model))]
    assert shapes[0] == (6, 6) and (6, 3) in shapes and shapes[3] == (0, 0)  # merged KV heads and a no-op layer
    report = export_model(model, tiny_tokenizer, "vllm", tmp_path / "deci")
    assert report["num_attention_heads"] == 6 and report["padding"]["padded_query_heads"] == 0
    assert report["padding"]["overhead"] == 0.0
    cfg = json.loads((tmp_path / "deci" / "config.json").read_text())
    attn = [b["attention"] for b in cfg["block_configs"]]
    assert [a["no_op"] for a in attn] == [False, False, False, True]
    assert [a.get("n_heads_in_group") for a in attn[:3]] == [6 // kv for _, kv in shapes[:3]]
    with safe_open(tmp_path / "deci" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert not any(n.startswith("model.layers.3.self_attn") for n in names)
    assert "model.layers.3.input_layernorm.weight" not in names and "model.layers.3.mlp.up_proj.weight" in names
    deci = AutoModelForCausalLM.from_pretrained(tmp_path / "deci", trust_remote_code=True, dtype=torch.float32)
    ids = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, deci.eval()(ids).logits, atol=1e-5, rtol=0)
    export_model(model, tiny_tokenizer, "gguf", tmp_path / "g")
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    field = {k: f.contents() for k, f in reader.fields.items()}
    assert field["deci.attention.head_count"] == [h for h, _ in shapes]
    assert field["deci.attention.head_count_kv"] == [kv for _, kv in shapes]
    assert not any(t.name.startswith("blk.3.attn") for t in reader.tensors)


def test_a_model_without_attention_in_layer_0_is_refused_for_vllm(tmp_path, tiny_tokenizer):
    model = merge_shrink(make_serving_model(), [(0, None), (None, None), (None, None)])
    with pytest.raises(UsageError, match="layer 0 has no attention"):
        export_model(model, tiny_tokenizer, "vllm", tmp_path / "deci")
    export_model(model, tiny_tokenizer, "gguf", tmp_path / "g")  # llama.cpp runs it
