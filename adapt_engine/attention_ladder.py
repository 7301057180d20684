"""Attention granularity as a ladder of rungs: the sizes a layer's attention may shrink to, what each keeps,
what it costs in parameters and in saliency.

A rung is a number of attention *units* a layer keeps; the allocation walks down a layer's ladder one rung
at a time, and each mode is one ladder:

* ``query`` (``--attention query``): units are query heads per KV group, rungs ``n_rep, …, 1``; KV heads stay.
* ``kv`` (``--attention kv``): units are KV groups (a KV head with all its query heads), rungs ``K, …, 1``.
* ``merge`` (``--deploy-target vllm``): units are KV heads, and every layer keeps all of its query heads,
  because vLLM's DeciLM runs one query-head count in every layer. The rungs are the divisors of the layer's
  current KV heads (adjacent KV heads are merged into one, their query heads attending through it, so
  ``n_heads_in_group`` always divides the query heads), then 0: no attention sub-layer at all (DeciLM's
  ``attention.no_op``). Layer 0 never loses its attention: vLLM cannot run a model whose first layer has none.
"""

from __future__ import annotations

import torch

from .adapters import DecoderAdapter, LayerShape
from .args import ATTENTION_MODES, MERGE

LADDERS = (*ATTENTION_MODES, MERGE)


def units_of(shape: LayerShape, mode: str) -> int:
    """Attention units a layer of ``shape`` has in ``mode``."""
    if mode == "query":
        return shape.num_heads // shape.num_kv_heads
    if mode in ("kv", MERGE):
        return shape.num_kv_heads
    raise ValueError(f"attention ladder must be one of {LADDERS}, got '{mode}'")


def rungs(current: LayerShape, mode: str, layer: int) -> list[int]:
    """The unit counts layer ``layer`` (now ``current``) may keep, from its current count down."""
    now = units_of(current, mode)
    if mode != MERGE:
        return list(range(now, 0, -1))
    if now == 0:
        return [0]
    merged = [k for k in range(now, 0, -1) if now % k == 0]
    return merged + ([0] if layer > 0 else [])


def shape_at(original: LayerShape, units: int, mode: str, intermediate: int) -> LayerShape:
    """The layer shape with ``units`` attention units kept (and ``intermediate`` MLP channels)."""
    if mode == "query":
        return LayerShape(units * original.num_kv_heads, original.num_kv_heads, intermediate)
    if mode == "kv":
        return LayerShape(units * (original.num_heads // original.num_kv_heads), units, intermediate)
    if mode == MERGE:
        return LayerShape(original.num_heads if units else 0, units, intermediate)
    raise ValueError(f"attention ladder must be one of {LADDERS}, got '{mode}'")


def attention_params(adapter: DecoderAdapter, layer: int, original: LayerShape, units: int, mode: str) -> int:
    """Parameters of layer ``layer``'s attention projections (with biases) when it keeps ``units`` units."""
    shape = shape_at(original, units, mode, 0)
    if shape.num_heads == 0:
        return 0  # no attention sub-layer: q/k/v/o and o_proj's bias are all gone
    return (shape.num_heads * adapter.params_per_query_head(layer)
            + shape.num_kv_heads * adapter.params_per_kv_head(layer) + adapter.o_bias_params())


def rung_costs(q_scores: torch.Tensor, kv_scores: torch.Tensor, current: LayerShape, mode: str,
               ladder: list[int]) -> dict[int, float]:
    """Saliency lost by going from the current attention to each rung of ``ladder`` (0 for the current one).

    ``query``/``kv``: the summed scores of the cheapest units removed. ``merge``: merging KV heads keeps, in each
    merged group, the most salient KV head's share, so the cost is the other heads' K/V saliency (the Taylor
    estimate of zeroing them, an upper bound on what replacing them by a merged head loses); no attention costs
    every query and KV head of the layer.
    """
    q = q_scores.double().cpu()
    kv = kv_scores.double().cpu()
    now = units_of(current, mode)
    if mode in ATTENTION_MODES:
        per_group = q.view(current.num_kv_heads, -1)
        if mode == "query":
            unit = per_group.sort(dim=1).values.sum(0)  # r-th unit = r-th cheapest query head of every group
        else:
            unit = (per_group.sum(1) + kv).sort().values
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), unit.cumsum(0)])
        return {r: float(cum[now - r]) for r in ladder}
    out = {}
    for r in ladder:
        if r == 0:
            out[r] = float(q.sum() + kv.sum())
        else:
            groups = kv.view(r, now // r)
            out[r] = float((groups.sum(1) - groups.max(1).values).sum())
    return out


def proportional_rung(adapter: DecoderAdapter, layer: int, original: LayerShape, ladder: list[int], mode: str,
                      sparsity: float) -> int:
    """The rung that gives attention the layer's sparsity ``sparsity`` (``--split proportional``).

    ``query``/``kv``: ``round(sparsity · units)`` units go. ``merge``: the rung whose attention parameters are
    closest to ``(1 − sparsity)`` of the original's.
    """
    if mode in ATTENTION_MODES:
        units_orig = units_of(original, mode)
        keep = units_orig - int(round(sparsity * units_orig))
        return max(ladder[-1], min(ladder[0], keep))
    full = attention_params(adapter, layer, original, units_of(original, mode), mode)
    want = (1.0 - sparsity) * full
    return min(ladder, key=lambda r: (abs(attention_params(adapter, layer, original, r, mode) - want), -r))
