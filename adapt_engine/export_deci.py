"""Write a model as a DeciLM (``nemotron-nas``) folder that vLLM serves and transformers loads.

The folder holds config.json (``block_configs``: each layer's ``n_heads_in_group`` and
``ffn.intermediate_size``), safetensors weights under the ordinary Llama names, the tokenizer, and two small
files (``configuration_decilm.py``, ``modeling_decilm.py``, with ``adapt_pruned_shapes.py`` for its no-attention
module) for ``trust_remote_code``. Query heads are padded with zero heads to one global count (see
:mod:`adapt_engine.export_layout`); a layer without attention is an ``attention.no_op`` block whose attention
tensors and input norm are left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .adapters import DecoderAdapter
from .export_layout import ServingLayer, padded_head_count, rope_parameters, serving_layers

REMOTE = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_decilm.py", "modeling_decilm.py", "adapt_pruned_shapes.py")


def _pad_heads(weight: torch.Tensor, layer: ServingLayer, padded: int, head_dim: int, dim: int) -> torch.Tensor:
    """Q rows (dim 0) or O columns (dim 1) with zero heads appended inside every KV group."""
    if layer.heads == padded:
        return weight
    per_group, padded_group = layer.heads // layer.kv_heads, padded // layer.kv_heads
    shape = list(weight.shape)
    shape[dim] = padded * head_dim
    out = weight.new_zeros(shape)
    for g in range(layer.kv_heads):
        src = slice(g * per_group * head_dim, (g + 1) * per_group * head_dim)
        dst = slice(g * padded_group * head_dim, (g * padded_group + per_group) * head_dim)
        if dim == 0:
            out[dst] = weight[src]
        else:
            out[:, dst] = weight[:, src]
    return out


def deci_tensors(adapter: DecoderAdapter, layers: list[ServingLayer], padded: int, dtype: torch.dtype) -> dict:
    """The DeciLM state dict: Llama names, Q/O padded to ``padded`` heads, in ``dtype``."""
    model, hd = adapter.model, adapter.head_dim
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.model.embed_tokens.weight,
                                    "model.norm.weight": model.model.norm.weight}
    if not model.config.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, (layer, shape) in enumerate(zip(adapter.layers, layers)):
        pre = f"model.layers.{i}."
        q, k, v, o = adapter.attention_projections(layer)
        gate, up, down = adapter.mlp_projections(layer)
        out[pre + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        for name, lin in (("mlp.gate_proj", gate), ("mlp.up_proj", up), ("mlp.down_proj", down)):
            out[pre + name + ".weight"] = lin.weight
            if lin.bias is not None:
                out[pre + name + ".bias"] = lin.bias
        if shape.heads == 0:
            continue  # attention.no_op: vLLM builds neither the attention nor its input norm
        out[pre + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[pre + "self_attn.q_proj.weight"] = _pad_heads(q.weight, shape, padded, hd, 0)
        out[pre + "self_attn.o_proj.weight"] = _pad_heads(o.weight, shape, padded, hd, 1)
        if q.bias is not None:
            out[pre + "self_attn.q_proj.bias"] = _pad_heads(q.bias, shape, padded, hd, 0)
        for name, lin in (("self_attn.k_proj", k), ("self_attn.v_proj", v)):
            out[pre + name + ".weight"] = lin.weight
            if lin.bias is not None:
                out[pre + name + ".bias"] = lin.bias
        if o.bias is not None:
            out[pre + "self_attn.o_proj.bias"] = o.bias
    return {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in out.items()}


def deci_config(adapter: DecoderAdapter, layers: list[ServingLayer], padded: int, dtype_name: str) -> dict:
    """config.json of the DeciLM export."""
    cfg = adapter.model.config
    q, _, _, o = adapter.attention_projections(adapter.layers[0])
    gate = adapter.mlp_projections(adapter.layers[0])[0]
    blocks = [{"attention": ({"no_op": False, "replace_with_linear": False, "n_heads_in_group": padded // s.kv_heads}
                             if s.heads else {"no_op": True, "replace_with_linear": False}),
               "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": s.intermediate}}
              for s in layers]
    out = {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": len(layers),
        "num_attention_heads": padded, "head_dim": adapter.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope_parameters(cfg), "attention_bias": o.bias is not None,
        "mlp_bias": gate.bias is not None, "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "block_configs": blocks, "dtype": dtype_name, "torch_dtype": dtype_name,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    }
    if (q.bias is not None) != (o.bias is not None):
        out["qkv_bias"] = q.bias is not None
    return out


def write_deci(adapter: DecoderAdapter, tokenizer, folder: Path, dtype: torch.dtype, dtype_name: str) -> dict:
    """Write the DeciLM files into ``folder`` (an empty temporary folder); returns the padding summary."""
    from safetensors.torch import save_file

    layers = serving_layers(adapter)
    padded = padded_head_count(layers)
    save_file(deci_tensors(adapter, layers, padded, dtype), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(deci_config(adapter, layers, padded, dtype_name), indent=2))
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE / name, folder / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    gen = getattr(adapter.model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    return {"num_attention_heads": padded, "layers": [s.__dict__ for s in layers]}
