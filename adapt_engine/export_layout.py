"""What a serving export needs to know about a model: whether the target can express it, and its layer shapes.

Both targets (vLLM's DeciLM and llama.cpp's ``deci``) run Llama-shaped layers with their own widths. vLLM
cannot vary the number of query heads per layer, so a layer with fewer query heads than the export's
global count gets zero heads in its KV groups: a zero Q row scores a constant, its softmax weights are
finite, and the matching zero O columns add exactly 0. That costs those heads' FLOPs, which
:func:`padding_cost` reports. llama.cpp takes per-layer query heads as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import lcm

import torch

from .adapters import DecoderAdapter, serving_blocker
from .errors import UsageError

SUPPORTED_ROPE = {"vllm": ("default", "linear", "llama3"), "gguf": ("default", "linear")}


@dataclass(frozen=True)
class ServingLayer:
    """Widths of one decoder layer as a serving engine sees them."""

    heads: int
    kv_heads: int
    intermediate: int


def rope_parameters(config) -> dict:
    """The model's RoPE settings as one dict (transformers 5 ``rope_parameters`` or the older fields)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        out = dict(params)
    else:
        out = dict(getattr(config, "rope_scaling", None) or {})
        out.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    return out


def check_exportable(model: torch.nn.Module, target: str) -> DecoderAdapter:
    """The model's adapter, or a UsageError naming what ``target`` ('vllm' or 'gguf') cannot express."""
    adapter = DecoderAdapter(model)
    config = model.config
    where = "vLLM's DeciLM" if target == "vllm" else "llama.cpp's deci architecture"
    blocker = serving_blocker(config)
    if blocker:
        raise UsageError(f"cannot export to {where}: {blocker}, which it cannot express. Llama, Mistral and Qwen2 "
                         f"models (and their pruned outputs) can be exported")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UsageError(f"cannot export to {where}: the MLP activation is '{act}', only SiLU (SwiGLU) is supported")
    rope = rope_parameters(config)
    if rope["rope_type"] not in SUPPORTED_ROPE[target]:
        raise UsageError(f"cannot export to {where}: RoPE type '{rope['rope_type']}' is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE[target])})")
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window and window < config.max_position_embeddings:
        raise UsageError(f"cannot export to {where}: attention uses a {window}-token sliding window, which it "
                         f"does not apply")
    if any(t != "full_attention" for t in layer_types):
        raise UsageError(f"cannot export to {where}: layer types {sorted(set(layer_types))} are not all full "
                         f"attention")
    for i, s in enumerate(adapter.shapes()):
        if s.num_heads == 0 and s.num_kv_heads == 0:
            if i == 0 and target == "vllm":
                raise UsageError("cannot export to vLLM's DeciLM: layer 0 has no attention, which vLLM cannot run "
                                 "(prune with --deploy-target vllm, which always keeps layer 0's attention)")
            continue  # no attention sub-layer: DeciLM's attention.no_op, llama.cpp's head_count 0
        if s.num_heads % s.num_kv_heads:
            raise UsageError(f"layer {i} has {s.num_heads} query heads for {s.num_kv_heads} KV heads; the heads "
                             f"of every KV group must be equal in number")
    return adapter


def serving_layers(adapter: DecoderAdapter) -> list[ServingLayer]:
    """Every layer's query heads, KV heads and MLP width."""
    return [ServingLayer(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in adapter.shapes()]


def padded_head_count(layers: list[ServingLayer]) -> int:
    """The fewest query heads every layer can be padded to: at least each layer's count, divisible by its KV heads.

    Layers without attention take no part (they have no heads to pad).
    """
    step = lcm(*(layer.kv_heads for layer in layers if layer.heads))
    widest = max(layer.heads for layer in layers)
    return -(-widest // step) * step


def padding_cost(layers: list[ServingLayer], padded_heads: int, hidden: int, head_dim: int, context: int,
                 model_flops_per_token: int) -> dict:
    """FLOPs per token that the zero query heads add: Q rows + O columns, and QK^T + AV over ``context``."""
    extra = sum(padded_heads - layer.heads for layer in layers if layer.heads)
    linear = 2 * 2 * hidden * head_dim * extra
    attention = 2 * 2 * head_dim * context * extra
    return {
        "padded_query_heads": extra, "projection_flops_per_token": linear,
        "attention_flops_per_token": attention, "context_len": context,
        "model_flops_per_token": model_flops_per_token,
        "overhead": (linear + attention) / model_flops_per_token if model_flops_per_token else 0.0,
    }
