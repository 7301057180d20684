"""Tiny random-weight models of every supported family, for fast offline tests."""

from __future__ import annotations

import torch

FAMILY_CASES = [
    ("llama", True), ("llama", False), ("llama-bias", True), ("mistral", True), ("qwen2", True), ("qwen2", False),
    ("qwen3", True),
]


def make_tiny_model(family: str, gqa: bool = True, layers: int = 3, vocab: int = 320, seed: int = 0):
    """A random-weight causal LM of ``family``; GQA (6 query / 2 KV heads) or plain MHA (4 / 4)."""
    import transformers

    torch.manual_seed(seed)
    heads, kv = (6, 2) if gqa else (4, 4)
    kw = dict(hidden_size=48, intermediate_size=80, num_attention_heads=heads, num_key_value_heads=kv,
              num_hidden_layers=layers, vocab_size=vocab, head_dim=8, max_position_embeddings=256,
              tie_word_embeddings=family in ("llama", "qwen3"))
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    if family == "llama-bias":  # Llama with attention_bias and mlp_bias: every projection has a bias
        family = "llama"
        kw.update(attention_bias=True, mlp_bias=True)
    cfg_cls, model_cls = classes[family]
    model = model_cls(cfg_cls(**kw)).eval()
    # Random init leaves many projections tiny; widen the spread so pruning choices matter in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model
