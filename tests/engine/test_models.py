"""Model loading: every damaged, forged or mistyped input is a clear AdaptEngineError before anything is
built; one default-dtype rule for every kind of model; size estimates from headers."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model

from adapt_engine.data import DataError, load_documents
from adapt_engine.errors import AdaptEngineError
from adapt_engine.model_files import ModelLoadError, read_gguf
from adapt_engine.models import estimate_model_bytes, load_model, resolve_spec
from adapt_engine.saving import PrunedModelError, save_pruned


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def _fails(spec, match, cls=ModelLoadError):
    with pytest.raises(cls, match=match) as info:
        load_model(str(spec))
    assert isinstance(info.value, AdaptEngineError)
    return info.value


def test_plain_folder_loads(model_dir):
    model, tok = load_model(str(model_dir))
    assert model.dtype == torch.float32 and len(tok) > 0


def test_truncated_safetensors_is_named(model_dir):
    f = model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails(model_dir, "model.safetensors is corrupt or truncated")


class _Payload:
    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def test_pickle_in_pytorch_model_bin_is_refused_not_run(model_dir, tmp_path):
    (model_dir / "model.safetensors").unlink()
    flag = tmp_path / "pwned"
    torch.save({"x": _Payload(flag)}, model_dir / "pytorch_model.bin")
    _fails(model_dir, "does not unpickle")
    assert not flag.exists()
    (model_dir / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    _fails(model_dir, "pytorch_model.bin")


def test_plain_tensor_bin_still_loads(model_dir):
    model, _ = load_model(str(model_dir))
    (model_dir / "model.safetensors").unlink()
    model.save_pretrained(model_dir, safe_serialization=False)
    again, _ = load_model(str(model_dir))
    x = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


@pytest.mark.parametrize("spec", ["./nonexistent", "typo_dir", "../nope/model", "missing.gguf"])
def test_mistyped_path_says_it_does_not_exist(spec):
    err = _fails(spec, "no such file or folder")
    assert "hub" not in str(err).split(".")[0] and "connect" not in str(err)


def test_empty_or_foreign_folder_is_not_a_model_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _fails(empty, "not a model folder")
    assert "sentencepiece" not in str(err)
    (empty / "notes.txt").write_text("hello")
    _fails(empty, "not a model folder")


def test_folder_without_weights_or_tokenizer(model_dir):
    shutil.move(model_dir / "model.safetensors", model_dir.parent / "w.safetensors")
    _fails(model_dir, "no weights")
    shutil.move(model_dir.parent / "w.safetensors", model_dir / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink(missing_ok=True)
    _fails(model_dir, "no tokenizer files")


def test_crafted_layer_count_is_rejected_at_once(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 100_000
    (model_dir / "config.json").write_text(json.dumps(cfg))
    start = time.monotonic()
    _fails(model_dir, "num_hidden_layers")
    cfg["num_hidden_layers"] = 7
    (model_dir / "config.json").write_text(json.dumps(cfg))
    _fails(model_dir, "declares 7 decoder layers but the weights hold 3")
    assert time.monotonic() - start < 5


def _tiny_gguf(path, n_tensors=3):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    for i in range(n_tensors):
        writer.add_tensor(f"blk.{i}.w", np.arange(64 * (i + 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_header_summary_and_truncation(tmp_path):
    path = _tiny_gguf(tmp_path / "m.gguf")
    summary = read_gguf(path)
    assert summary.num_params == 64 * (1 + 2 + 3) and summary.num_layers == 2
    assert summary.data_end == path.stat().st_size
    blob = path.read_bytes()
    path.write_bytes(blob[:-10])
    with pytest.raises(ModelLoadError, match="truncated: its tensors need"):
        read_gguf(path)
    path.write_bytes(blob[:40])
    with pytest.raises(ModelLoadError, match="truncated inside its header"):
        read_gguf(path)
    path.write_bytes(b"GGUF\x03\x00")
    _fails(path, "truncated")
    path.write_bytes(b"not a gguf file at all")
    _fails(path, "not a valid GGUF")


def test_calibration_data_with_one_document_gives_advice_that_exists(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single paragraph of text without blank lines")
    with pytest.raises(DataError, match="blank line") as info:
        load_documents(str(one), "train")
    assert "split 'all'" not in str(info.value) and isinstance(info.value, AdaptEngineError)


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents("./no/such/folder", "train")


def test_fp16_saved_models_load_alike_in_both_loaders(tmp_path, tiny_tokenizer):
    """One default-dtype rule: plain and pruned folders saved in fp16 both load in float32, same logits."""
    model = make_tiny_model("llama", vocab=len(tiny_tokenizer), layers=2).half()
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    tiny_tokenizer.save_pretrained(plain)
    pruned = save_pruned(model, tiny_tokenizer, tmp_path / "pruned")
    a, _ = load_model(str(plain))
    b, _ = load_model(str(pruned))
    assert a.dtype == b.dtype == torch.float32
    x = torch.randint(0, len(tiny_tokenizer), (2, 6))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    c, _ = load_model(str(pruned), dtype="fp16")
    assert c.dtype == torch.float16


def test_estimate_model_bytes_from_headers(tmp_path, tiny_tokenizer, model_dir):
    model, tok = load_model(str(model_dir))
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    est = estimate_model_bytes(str(model_dir), "float32")
    assert n * 4 <= est <= n * 4 + 4 * 2**20
    assert estimate_model_bytes(str(model_dir), "bf16") < est * 0.6
    saved = save_pruned(model, tok, tmp_path / "out")
    size = sum(f.stat().st_size for f in saved.iterdir() if f.is_file())
    assert abs(estimate_model_bytes(str(saved), "float32") - size) < 0.1 * size
    assert estimate_model_bytes("org/name", "float32") is None
    gguf_path = _tiny_gguf(tmp_path / "m.gguf")
    assert estimate_model_bytes(str(gguf_path), "float32") == 64 * 6 * 4
    with pytest.raises(ModelLoadError, match="no such file"):
        estimate_model_bytes("./missing", "float32")


def test_pruned_config_widths_are_checked(tmp_path, tiny_tokenizer):
    out = save_pruned(make_tiny_model("llama", vocab=len(tiny_tokenizer), layers=2), tiny_tokenizer, tmp_path / "m")
    good = json.loads((out / "config.json").read_text())
    cases = [
        ("layer_intermediate_sizes", ["80", 80], "is '80' \\(str\\)"),
        ("layer_num_attention_heads", [6.0, 6], "is 6.0 \\(float\\)"),
        ("layer_num_key_value_heads", [2], "one width per layer"),
        ("layer_num_attention_heads", [5, 6], "not a multiple"),
        ("num_hidden_layers", "2", "num_hidden_layers must be an integer"),
    ]
    for key, value, match in cases:
        cfg = dict(good, **{key: value})
        (out / "config.json").write_text(json.dumps(cfg))
        _fails(out, match, PrunedModelError)
    n = 100_000
    cfg = dict(good, num_hidden_layers=n, layer_intermediate_sizes=[80] * n, layer_num_attention_heads=[6] * n,
               layer_num_key_value_heads=[2] * n)
    (out / "config.json").write_text(json.dumps(cfg))
    start = time.monotonic()
    _fails(out, "num_hidden_layers", PrunedModelError)
    assert time.monotonic() - start < 5
    cfg = dict(good, num_hidden_layers=3, layer_intermediate_sizes=[80] * 3, layer_num_attention_heads=[6] * 3,
               layer_num_key_value_heads=[2] * 3)
    (out / "config.json").write_text(json.dumps(cfg))
    _fails(out, "declares 3 decoder layers but the weights hold 2", PrunedModelError)


def test_resolve_spec_takes_paths_and_hub_ids(tmp_path, model_dir):
    assert resolve_spec(model_dir) == model_dir and resolve_spec("org/name") == "org/name"
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_spec(tmp_path / "missing" / "deeper")


def test_gguf_transformers_cannot_read_is_a_clear_error(tmp_path):
    path = _tiny_gguf(tmp_path / "m.gguf")  # a valid GGUF file without a tokenizer or a known layout
    _fails(path, "transformers cannot load")


@pytest.mark.parametrize("edit,match", [
    ({"model_type": "frobnicator"}, "not a config transformers can build"),
    ({"hidden_size": "abc"}, "not a config transformers can build"),
    ({"hidden_size": 96}, "belong to different models"),
])
def test_damaged_config_of_a_plain_folder_is_named(model_dir, edit, match):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(edit)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    _fails(model_dir, match)


def test_damaged_tokenizer_is_named(model_dir):
    (model_dir / "tokenizer.json").write_text("{garbage")
    _fails(model_dir, "tokenizer files .* cannot be read")
