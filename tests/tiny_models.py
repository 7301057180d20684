"""Tiny random-weight models of every supported family, for fast offline tests."""

from __future__ import annotations

import importlib

import torch

from adapt_engine.adapters import FAMILIES

FAMILY_CASES = [
    ("llama", True), ("llama", False), ("llama-bias", True), ("mistral", True), ("qwen2", True), ("qwen2", False),
    ("qwen3", True),
] + [(family, True) for family in (
    "ministral", "gemma", "gemma2", "gemma3_text", "granite", "olmo", "smollm3", "helium", "exaone4", "seed_oss",
    "ernie4_5",
)]


def make_tiny_model(family: str, gqa: bool = True, layers: int = 3, vocab: int = 320, seed: int = 0):
    """A random-weight causal LM of ``family``; GQA (6 query / 2 KV heads) or plain MHA (4 / 4)."""
    torch.manual_seed(seed)
    heads, kv = (6, 2) if gqa else (4, 4)
    kw = dict(hidden_size=48, intermediate_size=80, num_attention_heads=heads, num_key_value_heads=kv,
              num_hidden_layers=layers, vocab_size=vocab, head_dim=8, max_position_embeddings=256,
              tie_word_embeddings=family in ("llama", "qwen3"))
    if family not in ("llama", "llama-bias", "mistral", "qwen2", "qwen3"):
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # their defaults lie outside the vocab
    if family == "llama-bias":  # Llama with attention_bias and mlp_bias: every projection has a bias
        family = "llama"
        kw.update(attention_bias=True, mlp_bias=True)
    # Random init leaves many projections tiny; widen the spread so pruning choices matter in tests.
    return build_family_model(family, kw, weight_std=0.2)


def build_family_model(family: str, config_kw: dict, weight_std: float):
    """A random-weight causal LM of ``family`` from config fields, matrices drawn with ``weight_std`` (biases 0.1)."""
    spec = FAMILIES[family]
    cfg_cls = getattr(importlib.import_module(spec.config_module), spec.config_class)
    model_cls = getattr(importlib.import_module(spec.modeling_module), spec.causal_lm_class)
    model = model_cls(cfg_cls(**config_kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, weight_std)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def save_tiny_llama(path, tokenizer):
    """A tiny Llama (GQA) with ``tokenizer``, saved at ``path`` as a user's local model folder; returns ``path``."""
    make_tiny_model("llama", gqa=True, vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
