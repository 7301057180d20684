"""Analytic forward FLOPs and parameter counts, read from the actual ``nn.Linear`` shapes.

A pruned model has different head counts and MLP widths in every layer, so nothing here trusts the
config: each decoder layer's projections are measured where they are. One multiply-add is 2 FLOPs.
Counted: every matmul in the decoder layers (q/k/v/o, gate/up/down), the attention score (QK^T) and
value (AV) products over the causal context, and the LM head. Not counted: norms, RoPE, softmax, the
SiLU gate and residual adds (elementwise, a few percent at most) and the embedding lookup (no FLOPs).
Attention is assumed to be full causal attention (no sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapters import count_params
from .errors import AdaptEngineError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class UnsupportedShapeError(AdaptEngineError, ValueError):
    """Raised when a model's decoder layers cannot be found or do not look like attention + MLP blocks."""


@dataclass(frozen=True)
class LayerMatmuls:
    """The matmul shapes of one decoder layer, as multiply-adds per token (``adapters.LayerShape`` holds widths)."""

    index: int
    linears: dict[str, tuple[int, int]]  # leaf module name (q_proj, ..., down_proj) -> (in, out) features
    score_width: int  # q_proj.out_features = query heads x head_dim: width of the QK^T product
    value_width: int  # o_proj.in_features = query heads x value head dim: width of the AV product
    kv_width: int  # k_proj.out_features + v_proj.out_features: cached values per token
    num_heads: int | None  # query heads, when the attention module states its head_dim

    @property
    def linear_macs(self) -> dict[str, int]:
        """Multiply-adds per token of each projection."""
        return {name: fan_in * fan_out for name, (fan_in, fan_out) in self.linears.items()}

    @property
    def max_width(self) -> int:
        """The widest projection output of the layer (sizes the largest activation)."""
        return max((fan_out for _, fan_out in self.linears.values()), default=0)


@dataclass(frozen=True)
class ModelShape:
    """Per-layer matmul shapes of a causal LM plus its LM head."""

    layers: tuple[LayerMatmuls, ...]
    head_macs: int  # lm_head in_features * out_features
    other_macs: int  # any other nn.Linear outside the decoder layers and the head
    hidden_size: int
    vocab_size: int
    params: int
    embedding_params: int

    @property
    def linear_flops_per_token(self) -> int:
        """FLOPs of every matmul with a weight, for one token (context-independent part)."""
        return self.layer_linear_flops_per_token + self.head_flops_per_token

    @property
    def layer_linear_flops_per_token(self) -> int:
        """Weight-matmul FLOPs of the decoder layers only (no LM head), for one token."""
        return 2 * (sum(sum(layer.linear_macs.values()) for layer in self.layers) + self.other_macs)

    @property
    def head_flops_per_token(self) -> int:
        """LM-head FLOPs for one token."""
        return 2 * self.head_macs

    @property
    def attention_flops_per_context_token(self) -> int:
        """Score + value FLOPs per query token and per token of context, summed over layers."""
        return 2 * sum(layer.score_width + layer.value_width for layer in self.layers)

    @property
    def kv_values_per_token(self) -> int:
        """Values stored in the KV cache per token, summed over layers."""
        return sum(layer.kv_width for layer in self.layers)


def _find(module: nn.Module, name: str) -> nn.Module | None:
    for child_name, child in module.named_modules():
        if child_name == name or child_name.endswith("." + name):
            return child
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list: the longest ModuleList whose every entry holds a ``q_proj``."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if best is None or len(module) > len(best):
            if all(isinstance(_find(layer, "q_proj"), nn.Linear) for layer in module):
                best = module
    if best is None:
        raise UnsupportedShapeError(
            f"{type(model).__name__} has no list of decoder layers with nn.Linear q/k/v/o_proj; "
            "FLOPs are counted for Llama-style decoders (the families in adapt_engine.adapters.FAMILIES, "
            "e.g. Llama, Mistral, Qwen2/3, Gemma). Pass a *ForCausalLM model of one of those families."
        )
    return best


def _layer_shape(index: int, layer: nn.Module) -> LayerMatmuls:
    linears: dict[str, tuple[int, int]] = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            linears[leaf if leaf not in linears else name] = (module.in_features, module.out_features)
    missing = [name for name in ATTENTION_PROJECTIONS if name not in linears]
    if missing:
        raise UnsupportedShapeError(
            f"decoder layer {index} has no nn.Linear {', '.join(missing)}; FLOPs are counted for Llama-style "
            "attention with separate q/k/v/o projections."
        )
    q, k, v, o = (_find(layer, name) for name in ATTENTION_PROJECTIONS)
    attention = next((m for m in layer.modules() if getattr(m, "q_proj", None) is q), None)
    head_dim = getattr(attention, "head_dim", None)
    return LayerMatmuls(
        index=index,
        linears=linears,
        score_width=q.out_features,
        value_width=o.in_features,
        kv_width=k.out_features + v.out_features,
        num_heads=q.out_features // head_dim if isinstance(head_dim, int) and head_dim > 0 else None,
    )


def model_shape(model: nn.Module) -> ModelShape:
    """Read every matmul shape of a causal LM from its modules (works for irregular pruned layers)."""
    layers = decoder_layers(model)
    shapes = tuple(_layer_shape(i, layer) for i, layer in enumerate(layers))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(head, nn.Linear) or not isinstance(embed, nn.Embedding):
        raise UnsupportedShapeError(
            f"{type(model).__name__} has no nn.Embedding input embeddings and nn.Linear LM head; "
            "pass a *ForCausalLM model (not the bare decoder)."
        )
    inside = {id(m) for layer in layers for m in layer.modules()} | {id(head)}
    other = sum(m.in_features * m.out_features for m in model.modules()
                if isinstance(m, nn.Linear) and id(m) not in inside)
    return ModelShape(
        layers=shapes,
        head_macs=head.in_features * head.out_features,
        other_macs=other,
        hidden_size=embed.embedding_dim,
        vocab_size=head.out_features,
        params=count_params(model),
        embedding_params=count_params(embed, head),
    )


def forward_flops_per_token(shape: ModelShape, context_len: int) -> int:
    """FLOPs of one token's forward pass when it attends to ``context_len`` tokens (itself included)."""
    return shape.linear_flops_per_token + shape.attention_flops_per_context_token * context_len


def prefill_flops(shape: ModelShape, batch_size: int, prompt_len: int, logits_tokens: int = 1) -> int:
    """FLOPs of a causal prefill over ``prompt_len`` tokens, the LM head applied to ``logits_tokens`` of them.

    Token i (1-based) attends to i tokens, so the attention context sums to L(L+1)/2 per sequence.
    ``generate`` keeps the logits of the last position only, hence ``logits_tokens=1``.
    """
    per_seq = (shape.layer_linear_flops_per_token * prompt_len
               + shape.head_flops_per_token * logits_tokens
               + shape.attention_flops_per_context_token * prompt_len * (prompt_len + 1) // 2)
    return batch_size * per_seq


def decode_flops(shape: ModelShape, batch_size: int, prompt_len: int, new_tokens: int) -> int:
    """FLOPs of the ``new_tokens - 1`` cached decode steps after a prefill (which yields the first token)."""
    steps = max(new_tokens - 1, 0)
    # Step j (1..steps) feeds one token that attends to prompt_len + j cached-plus-own positions.
    context_sum = steps * prompt_len + steps * (steps + 1) // 2
    per_seq = shape.linear_flops_per_token * steps + shape.attention_flops_per_context_token * context_sum
    return batch_size * per_seq


def flops_breakdown(shape: ModelShape, context_len: int) -> dict:
    """Per-layer FLOPs of one token at ``context_len`` context: each projection, attention, and the head."""
    layers = []
    for layer in shape.layers:
        entry = {name: 2 * macs for name, macs in layer.linear_macs.items()}
        entry["attention_scores"] = 2 * layer.score_width * context_len
        entry["attention_values"] = 2 * layer.value_width * context_len
        entry["total"] = sum(entry.values())
        layers.append(entry)
    total = sum(layer["total"] for layer in layers) + 2 * (shape.head_macs + shape.other_macs)
    return {"context_len": context_len, "layers": layers, "lm_head": 2 * shape.head_macs,
            "other": 2 * shape.other_macs, "total": total}


def kv_cache_bytes(shape: ModelShape, batch_size: int, seq_len: int, bytes_per_value: int) -> int:
    """Bytes of a full KV cache for ``batch_size`` sequences of ``seq_len`` tokens."""
    return batch_size * seq_len * shape.kv_values_per_token * bytes_per_value
