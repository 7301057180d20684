"""Pruned model shapes for the serving-export tests, made by direct surgery (no calibration, fast)."""

from __future__ import annotations

import torch

from adapt_engine.adapters import DecoderAdapter
from adapt_engine.groups import LayerKeep
from adapt_engine.surgery import apply_plan


def shrink(model, plan: list[tuple[list[int] | None, list[int] | None, int | None]], seed: int = 0):
    """Keep, per layer, the listed query heads, KV heads (with their query heads) and a random ``mlp`` channels."""
    adapter = DecoderAdapter(model)
    gen = torch.Generator().manual_seed(seed)
    keeps = []
    for (q, kv, mlp), layer in zip(plan, adapter.layers):
        width = adapter.mlp_projections(layer)[0].out_features
        channels = None if mlp is None else torch.randperm(width, generator=gen)[:mlp].sort().values
        keeps.append(LayerKeep(None if q is None else torch.tensor(q), None if kv is None else torch.tensor(kv),
                               channels))
    apply_plan(adapter, keeps)
    return model


def make_serving_model(family: str = "llama", seed: int = 0, **overrides):
    """A small random Llama-shaped model vLLM's CPU attention accepts (head_dim 32): 6 query / 2 KV heads, 3 layers."""
    import importlib

    from adapt_engine.adapters import FAMILIES

    torch.manual_seed(seed)
    kw = dict(hidden_size=96, intermediate_size=128, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
              num_hidden_layers=3, vocab_size=320, max_position_embeddings=256, tie_word_embeddings=False,
              rope_theta=10000.0)
    kw.update(overrides)
    spec = FAMILIES[family]
    cfg = getattr(importlib.import_module(spec.config_module), spec.config_class)(**kw)
    model = getattr(importlib.import_module(spec.modeling_module), spec.causal_lm_class)(cfg).eval()
    with torch.no_grad():  # wider than the default init, so logits have clear winners
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model
