"""A DeciLM (``nemotron-nas``) model for transformers, as adapt-engine exports it (copied next to the model).

transformers has no DeciLM class, so ``from_pretrained(..., trust_remote_code=True)`` builds the stock
Llama model and resizes each layer to its block config before the weights load: layer i has
``num_attention_heads // n_heads_in_group`` KV heads and an MLP of ``ffn.intermediate_size`` channels.
An ``attention.no_op`` block (a layer whose attention was pruned away) gets a module that adds nothing, and no
input norm. Only the shapes adapt-engine writes are accepted (no FFN no-op or linear-replacement blocks).
"""

from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from .adapt_pruned_shapes import NoAttention
from .configuration_decilm import DeciLMConfig


def _linear(in_features, out_features, bias, like):
    return nn.Linear(in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(config)
        blocks = config.block_configs
        if len(blocks) != config.num_hidden_layers:
            raise ValueError(f"config.block_configs has {len(blocks)} entries for {config.num_hidden_layers} layers")
        hidden, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        qkv_bias = getattr(config, "qkv_bias", config.attention_bias)
        for i, (layer, block) in enumerate(zip(self.model.layers, blocks)):
            att, ffn = block.attention, block.ffn
            if getattr(ffn, "no_op", False) or any(getattr(sec, "replace_with_linear", False) for sec in (att, ffn)):
                raise ValueError(f"layer {i}: ffn no_op and replace_with_linear blocks are not supported here")
            a = layer.self_attn
            if getattr(att, "no_op", False):
                layer.self_attn = NoAttention(hidden, head_dim, qkv_bias, a.q_proj, projections=False)
                layer.input_layernorm = nn.Identity()  # its output is never used, and the export has no weight
            else:
                if heads % att.n_heads_in_group:
                    raise ValueError(f"layer {i}: n_heads_in_group {att.n_heads_in_group} does not divide {heads}")
                kv = heads // att.n_heads_in_group
                a.q_proj = _linear(hidden, heads * head_dim, qkv_bias, a.q_proj)
                a.k_proj = _linear(hidden, kv * head_dim, qkv_bias, a.k_proj)
                a.v_proj = _linear(hidden, kv * head_dim, qkv_bias, a.v_proj)
                a.o_proj = _linear(heads * head_dim, hidden, config.attention_bias, a.o_proj)
                a.num_key_value_groups = att.n_heads_in_group
            width = ffn.intermediate_size
            m = layer.mlp
            m.gate_proj = _linear(hidden, width, config.mlp_bias, m.gate_proj)
            m.up_proj = _linear(hidden, width, config.mlp_bias, m.up_proj)
            m.down_proj = _linear(width, hidden, config.mlp_bias, m.down_proj)
            if hasattr(m, "intermediate_size"):
                m.intermediate_size = width
        self.post_init()
