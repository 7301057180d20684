"""Config of a DeciLM (``nemotron-nas``) model as adapt-engine exports it (copied next to the model).

DeciLM is Llama with per-layer widths: ``block_configs[i].attention.n_heads_in_group`` gives layer i's
KV heads (``num_attention_heads // n_heads_in_group``) and ``block_configs[i].ffn.intermediate_size`` its
MLP width. vLLM's ``DeciLMForCausalLM`` reads the block configs as attributes, so they are objects here
and plain dicts in config.json. Neither vLLM nor transformers ships this class.
"""

from transformers import PretrainedConfig


class _Section:
    """One part of a block config (``attention`` or ``ffn``): its JSON keys as attributes."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def to_dict(self):
        return dict(self.__dict__)


class DeciBlockConfig:
    """Shapes of one decoder layer: ``.attention`` and ``.ffn``."""

    def __init__(self, attention=None, ffn=None, **extra):
        self.attention = _Section(**(attention or {}))
        self.ffn = _Section(**(ffn or {}))
        self.__dict__.update(extra)

    def to_dict(self):
        out = {k: v for k, v in self.__dict__.items() if k not in ("attention", "ffn")}
        out["attention"] = self.attention.to_dict()
        out["ffn"] = self.ffn.to_dict()
        return out


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=None, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                 max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
                 rope_parameters=None, attention_bias=False, qkv_bias=None, attention_dropout=0.0,
                 mlp_bias=False, block_configs=None, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias
        if qkv_bias is not None:  # q/k/v biases without an o_proj bias (Qwen2 style)
            self.qkv_bias = qkv_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        blocks = [b if isinstance(b, DeciBlockConfig) else DeciBlockConfig(**b) for b in (block_configs or [])]
        self.block_configs = blocks
        # Llama-style global fields, for code that reads them: the widest layer.
        kv = [num_attention_heads // b.attention.n_heads_in_group for b in blocks if not b.attention.no_op]
        self.num_key_value_heads = num_key_value_heads or (max(kv) if kv else num_attention_heads)
        ffn = [b.ffn.intermediate_size for b in blocks if not b.ffn.no_op]
        self.intermediate_size = intermediate_size or (max(ffn) if ffn else 0)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
