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
    from tiny_models import build_family_model

    torch.manual_seed(seed)
    kw = dict(hidden_size=96, intermediate_size=128, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
              num_hidden_layers=3, vocab_size=320, max_position_embeddings=256, tie_word_embeddings=False,
              rope_theta=10000.0)
    kw.update(overrides)
    return build_family_model(family, kw, weight_std=0.15)  # wider than the default init: clear winners


def merge_shrink(model, plan: list[tuple[int | None, int | None]], seed: int = 0):
    """``--deploy-target vllm`` shapes by direct surgery: per layer, the KV heads to merge into (0 removes the
    attention, None leaves it) and the number of random MLP channels to keep (None: all)."""
    from adapt_engine.adapters import LayerShape
    from adapt_engine.groups import attention_keep

    adapter = DecoderAdapter(model)
    gen = torch.Generator().manual_seed(seed)
    keeps = []
    for (kv, mlp), s in zip(plan, adapter.shapes()):
        new = LayerShape(s.num_heads if kv != 0 else 0, s.num_kv_heads if kv is None else kv, s.intermediate_size)
        keep = attention_keep(torch.rand(s.num_heads, generator=gen), torch.rand(s.num_kv_heads, generator=gen), s,
                              new, "merge")
        if mlp is not None:
            keep.mlp = torch.randperm(s.intermediate_size, generator=gen)[:mlp].sort().values
        keeps.append(keep)
    apply_plan(adapter, keeps)
    return model


def vllm_target_model():
    """A tiny serving model (6 query heads, 6 KV heads, 4 layers) pruned by ``AdaptPruner`` for
    ``--deploy-target vllm`` to 55 %: KV heads merged 6 -> 3 in layers 1-2 and layer 3's attention removed."""
    from adapt_engine.pruner import AdaptPruner, PruneSettings

    model = make_serving_model(num_hidden_layers=4, num_key_value_heads=6)
    calib = torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(0))
    pruner = AdaptPruner(model, PruneSettings(steps=2, deploy_target="vllm", calib_batch_size=8), calib)
    pruner.prune_to(pruner.target_from_sparsity(0.55))
    return model
