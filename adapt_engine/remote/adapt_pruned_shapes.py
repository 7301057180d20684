"""Rebuild per-layer widths of an adapt-engine pruned model (copied next to the model; torch only).

A pruned decoder keeps the stock architecture but each layer has its own number of attention heads,
KV heads and MLP channels. The config lists them per layer; this module resizes the freshly built
stock modules to match before the weights are loaded.
"""

from torch import nn

LAYER_HEADS_KEY = "layer_num_attention_heads"
LAYER_KV_HEADS_KEY = "layer_num_key_value_heads"
LAYER_MLP_KEY = "layer_intermediate_sizes"


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
        if n_q < 1 or n_kv < 1 or inter < 1 or n_q % n_kv:
            raise ValueError(f"invalid layer widths heads={n_q} kv_heads={n_kv} mlp={inter} in config.json")
        attn = layer.self_attn
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

