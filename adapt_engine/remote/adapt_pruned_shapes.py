"""Rebuild per-layer widths of an adapt-engine pruned model (copied next to the model; torch only).

A pruned decoder keeps the stock architecture but each layer has its own number of attention heads,
KV heads and MLP channels. The config lists them per layer; this module resizes the freshly built
stock modules to match before the weights are loaded. A layer with 0 query heads and 0 KV heads has no
attention at all (``--deploy-target vllm`` removes whole attention sub-layers): its attention module is
replaced by :class:`NoAttention`, which adds nothing to the residual stream.
"""

import torch
from torch import nn

LAYER_HEADS_KEY = "layer_num_attention_heads"
LAYER_KV_HEADS_KEY = "layer_num_key_value_heads"
LAYER_MLP_KEY = "layer_intermediate_sizes"


def _empty_linear(in_features: int, out_features: int, bias: bool, **kw) -> nn.Linear:
    """A 0-wide nn.Linear, built without its initialiser (nothing to initialise, and torch warns if asked to)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = in_features, out_features
    lin.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
    lin.register_parameter("bias", nn.Parameter(torch.empty(out_features, **kw)) if bias else None)
    return lin


class NoAttention(nn.Module):
    """An attention sub-layer with no heads: it outputs zeros, so the residual passes through unchanged.

    It keeps empty q/k/v/o projections (0 heads wide, no o_proj bias) so that code walking every layer's
    projections finds them; they hold no parameters and are never called. ``projections=False`` leaves them
    out (DeciLM folders, whose no-op layers have no attention tensors at all).
    """

    def __init__(self, hidden_size: int, head_dim: int, qkv_bias: bool, like: nn.Linear | None = None,
                 projections: bool = True):
        super().__init__()
        kw = {} if like is None else {"device": like.weight.device, "dtype": like.weight.dtype}
        self.head_dim = head_dim
        self.num_key_value_groups = 0
        if not projections:
            return
        self.q_proj = _empty_linear(hidden_size, 0, qkv_bias, **kw)
        self.k_proj = _empty_linear(hidden_size, 0, qkv_bias, **kw)
        self.v_proj = _empty_linear(hidden_size, 0, qkv_bias, **kw)
        self.o_proj = _empty_linear(0, hidden_size, False, **kw)

    @classmethod
    def taking_over(cls, attn: nn.Module) -> "NoAttention":
        """A NoAttention that keeps ``attn``'s (already emptied) projections, so optimizers still find them."""
        out = cls(attn.o_proj.out_features, attn.head_dim, False)
        out.q_proj, out.k_proj, out.v_proj, out.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        out.o_proj.bias = None  # no attention adds no bias either (as vLLM's and llama.cpp's no-op layers)
        return out

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """Zero attention output (and no attention weights), whatever the decoder layer passes in."""
        return torch.zeros_like(hidden_states), None


def _resized(lin: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    if lin.out_features == out_features and lin.in_features == in_features:
        return lin
    return nn.Linear(in_features, out_features, bias=lin.bias is not None,
                     device=lin.weight.device, dtype=lin.weight.dtype)


def apply_layer_shapes(model: nn.Module, config) -> nn.Module:
    """Resize every decoder layer of ``model`` to the per-layer widths recorded in ``config``."""
    heads = getattr(config, LAYER_HEADS_KEY, None)
    kv_heads = getattr(config, LAYER_KV_HEADS_KEY, None)
    mlp = getattr(config, LAYER_MLP_KEY, None)
    layers = model.model.layers
    for name, values in ((LAYER_HEADS_KEY, heads), (LAYER_KV_HEADS_KEY, kv_heads), (LAYER_MLP_KEY, mlp)):
        if values is None or len(values) != len(layers):
            raise ValueError(
                f"config.{name} must list one value per decoder layer ({len(layers)}), got {values!r}; "
                f"the config.json of this pruned model is damaged or was edited"
            )
    hidden = config.hidden_size
    for layer, n_q, n_kv, inter in zip(layers, heads, kv_heads, mlp):
        no_attention = n_q == 0 and n_kv == 0
        if inter < 1 or (not no_attention and (n_q < 1 or n_kv < 1 or n_q % n_kv)):
            raise ValueError(f"invalid layer widths heads={n_q} kv_heads={n_kv} mlp={inter} in config.json")
        attn = layer.self_attn
        if no_attention:
            layer.self_attn = NoAttention(hidden, attn.head_dim, attn.q_proj.bias is not None, attn.q_proj)
        else:
            d = attn.head_dim
            attn.q_proj = _resized(attn.q_proj, n_q * d, hidden)
            attn.k_proj = _resized(attn.k_proj, n_kv * d, hidden)
            attn.v_proj = _resized(attn.v_proj, n_kv * d, hidden)
            attn.o_proj = _resized(attn.o_proj, hidden, n_q * d)
            attn.num_key_value_groups = n_q // n_kv
            for attr, value in (("num_heads", n_q), ("num_key_value_heads", n_kv)):
                if hasattr(attn, attr):
                    setattr(attn, attr, value)
        m = layer.mlp
        m.gate_proj = _resized(m.gate_proj, inter, hidden)
        m.up_proj = _resized(m.up_proj, inter, hidden)
        m.down_proj = _resized(m.down_proj, hidden, inter)
        if hasattr(m, "intermediate_size"):
            m.intermediate_size = inter
    return model
