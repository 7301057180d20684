"""Write a model as a llama.cpp GGUF of architecture ``deci``: every layer keeps its own widths.

``deci.attention.head_count``, ``deci.attention.head_count_kv`` and ``deci.feed_forward_length`` hold one
value per layer. llama.cpp applies RoPE to adjacent pairs of a head's dimensions where transformers rotates
its two halves, so each layer's Q and K rows are reordered with that layer's own head counts. llama.cpp's
``deci`` graph skips a layer's residual add of attention when its FFN width is 0, so such a layer gets a
one-channel all-zero FFN (adds exactly 0). A layer without attention (``prune --deploy-target vllm``) has
head_count 0, which llama.cpp's ``deci`` graph runs as an attention-free layer; it has no attention tensors.
The byte-level BPE tokenizer is carried over.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .adapters import DecoderAdapter
from .errors import UsageError
from .export_layout import rope_parameters, serving_layers

ARCH = "deci"
GGUF_NAME = "model.gguf"

def rope_rows_to_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' half-split RoPE layout to llama.cpp's adjacent pairs."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None if it has none of ours."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or not byte_level.get("use_regex", True):
        return None
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    return None


def _vocab(tokenizer, vocab_size: int, scratch: Path) -> tuple[dict, list[str]]:
    """Tokenizer metadata for GGUF (byte-level BPE only) and warnings about it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError("GGUF export needs a fast (tokenizer.json) tokenizer; this model's tokenizer has none")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not any(
            (s or {}).get("type") == "ByteLevel" for s in (spec.get("pre_tokenizer"), spec.get("decoder"))):
        raise UsageError(f"GGUF export carries over byte-level BPE tokenizers only; this one is "
                         f"{model.get('type')} (SentencePiece-style vocabularies are not supported yet)")
    warnings = []
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        pre = "default"
        warnings.append(f"tokenizer.json pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} has no "
                        f"llama.cpp name; wrote 'default', so llama.cpp may split text differently (token ids "
                        f"given directly are unaffected)")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = added.get("special", False)
    if max(by_id) >= vocab_size:
        raise UsageError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        else:
            tokens.append(by_id[i])
            types.append(1 if i not in special else (3 if special[i] else 4))  # NORMAL, CONTROL, USER_DEFINED
    tokenizer.save_pretrained(scratch)
    return {"pre": pre, "tokens": tokens, "types": types}, warnings


def _tensor(t: torch.Tensor, dtype: torch.dtype):
    """(numpy array, raw GGML type or None) of a tensor in ``dtype``; bfloat16 goes as raw 16-bit words."""
    import gguf

    t = t.detach().to("cpu", torch.float32).contiguous()
    if dtype == torch.bfloat16:
        return t.to(torch.bfloat16).view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16
    return t.to(dtype).numpy(), None


def write_gguf(adapter: DecoderAdapter, tokenizer, folder: Path, dtype: torch.dtype, name: str) -> dict:
    """Write ``folder/model.gguf``; returns the per-layer shapes and any warnings."""
    import gguf

    cfg = adapter.model.config
    rope = rope_parameters(cfg)
    layers = serving_layers(adapter)
    hd, hidden = adapter.head_dim, cfg.hidden_size
    vocab, warnings = _vocab(tokenizer, cfg.vocab_size, folder / ".tokenizer") if tokenizer is not None else (None, [])
    ffn = [max(s.intermediate, 1) for s in layers]
    w = gguf.GGUFWriter(str(folder / GGUF_NAME), ARCH)
    w.add_name(name)
    w.add_file_type({torch.float32: 0, torch.float16: 1, torch.bfloat16: 32}[dtype])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(len(layers))
    w.add_feed_forward_length(ffn)
    w.add_head_count([s.heads for s in layers])
    w.add_head_count_kv([s.kv_heads for s in layers])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if vocab is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        gguf.SpecialVocab(folder / ".tokenizer", load_merges=True, n_vocab=cfg.vocab_size).add_to_gguf(w, quiet=True)

    def put(key: str, t: torch.Tensor, keep_f32: bool = False) -> None:
        arr, raw = _tensor(t, torch.float32 if keep_f32 else dtype)
        w.add_tensor(key, arr, raw_dtype=raw)

    model = adapter.model
    put("token_embd.weight", model.model.embed_tokens.weight)
    put("output_norm.weight", model.model.norm.weight, keep_f32=True)
    if not cfg.tie_word_embeddings:
        put("output.weight", model.lm_head.weight)
    for i, (layer, s) in enumerate(zip(adapter.layers, layers)):
        q, k, v, o = adapter.attention_projections(layer)
        gate, up, down = adapter.mlp_projections(layer)
        pre = f"blk.{i}."
        if s.heads:  # head_count 0: llama.cpp skips the layer's attention (and its norm), so nothing is written
            put(pre + "attn_norm.weight", layer.input_layernorm.weight, keep_f32=True)
            put(pre + "attn_q.weight", rope_rows_to_pairs(q.weight, s.heads))
            put(pre + "attn_k.weight", rope_rows_to_pairs(k.weight, s.kv_heads))
            put(pre + "attn_v.weight", v.weight)
            put(pre + "attn_output.weight", o.weight)
            for key, bias, heads in (("attn_q", q.bias, s.heads), ("attn_k", k.bias, s.kv_heads),
                                     ("attn_v", v.bias, 0), ("attn_output", o.bias, 0)):
                if bias is not None:
                    put(pre + key + ".bias", rope_rows_to_pairs(bias, heads) if heads else bias, keep_f32=True)
        put(pre + "ffn_norm.weight", layer.post_attention_layernorm.weight, keep_f32=True)
        if s.intermediate == 0:  # see the module docstring: one zero channel keeps the attention output
            zero = torch.zeros(1, hidden)
            put(pre + "ffn_gate.weight", zero)
            put(pre + "ffn_up.weight", zero)
            put(pre + "ffn_down.weight", zero.T)
            continue
        put(pre + "ffn_gate.weight", gate.weight)
        put(pre + "ffn_up.weight", up.weight)
        put(pre + "ffn_down.weight", down.weight)
        for key, lin in (("ffn_gate", gate), ("ffn_up", up), ("ffn_down", down)):
            if lin.bias is not None:
                put(pre + key + ".bias", lin.bias, keep_f32=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if vocab is not None:
        import shutil

        shutil.rmtree(folder / ".tokenizer")
    return {"file": GGUF_NAME, "layers": [s.__dict__ for s in layers], "warnings": warnings}
