"""Per-layer sparsity (Adapt-Pruner Eq. 6) and the parameter accounting that turns it into widths.

Layer j's sparsity is ``S_j = clip(S_cur − A·I_j, 0, 0.99)`` of its *original* prunable parameters,
with ``I`` normalised to mean 0 and max |I| = 1 (A = 0 is uniform, LLM-Pruner-style, pruning). That is
the paper's Eq. 6 (``--layer-update absolute``). The authors' code instead moves each layer's sparsity
by the step's overall increment, ``s_j ← clip(s_j + ΔS − A·I_j, 0, 0.99)`` (``--layer-update
incremental``, the default), so a layer that stays (un)important drifts further at every sub-step.
Attention comes in coarse units (a query head per KV group, or a whole KV group), so each layer first
takes the attention units closest to its share, and MLP channels — fine-grained — absorb the rest.
A final apportionment moves MLP channels between layers so the whole model lands on the requested
parameter count to within half an MLP channel (``3·hidden`` parameters), or half of ``round_to``
channels when widths must be multiples of ``round_to``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters import DecoderAdapter, LayerShape

MAX_LAYER_SPARSITY = 0.99


@dataclass
class LayerBudget:
    """Target widths of one layer after a pruning sub-step."""

    attention_units: int  # query heads per KV group ("query") or KV groups ("kv") kept
    intermediate_size: int


def layer_sparsities(current: float, importance: torch.Tensor, amplitude: float) -> torch.Tensor:
    """``clip(S_cur − A·I_j, 0, 0.99)`` per layer."""
    return (current - amplitude * importance).clamp(0.0, MAX_LAYER_SPARSITY)


def incremental_sparsities(previous: torch.Tensor, increment: float, importance: torch.Tensor,
                           amplitude: float) -> torch.Tensor:
    """``clip(s_j + ΔS − A·I_j, 0, 0.99)`` per layer: the authors' code's per-sub-step update."""
    return (previous + increment - amplitude * importance).clamp(0.0, MAX_LAYER_SPARSITY)


def _attention_units(shape: LayerShape, mode: str) -> int:
    return shape.num_heads // shape.num_kv_heads if mode == "query" else shape.num_kv_heads


def _params_per_unit(adapter: DecoderAdapter, index: int, shape: LayerShape, mode: str) -> int:
    if mode == "query":  # one query head in each KV group
        return shape.num_kv_heads * adapter.params_per_query_head(index)
    n_rep = shape.num_heads // shape.num_kv_heads
    return n_rep * adapter.params_per_query_head(index) + adapter.params_per_kv_head(index)


def _snap(width: int, round_to: int, original: int) -> int:
    """Nearest allowed width: a multiple of ``round_to`` (the original width is always allowed)."""
    if round_to <= 1 or width >= original:
        return min(width, original)
    return max(round_to, int(round(width / round_to)) * round_to)


def apportion_mlp(
    desired_removed: list[float],
    current: list[int],
    original: list[int],
    total_keep: int,
    round_to: int,
) -> list[int]:
    """Integer MLP widths near ``original − desired_removed`` that sum as closely as possible to
    ``total_keep``, never wider than ``current`` (pruning is monotone) and at least ``round_to``
    (or 1) channels per layer."""
    step = max(round_to, 1)
    floor_w = [min(c, step) for c in current]
    widths = [
        min(c, max(f, _snap(int(round(o - d)), round_to, o)))
        for d, c, o, f in zip(desired_removed, current, original, floor_w)
    ]
    target = [o - d for d, o in zip(desired_removed, original)]

    def can_shrink(j: int) -> bool:
        return widths[j] - step >= floor_w[j]

    def can_grow(j: int) -> bool:
        return widths[j] + step <= current[j]

    # Greedy moves of one step each, always on the layer furthest from its own target; at most a few
    # hundred moves in practice since the start is already each layer's rounded target.
    while True:
        gap = sum(widths) - total_keep
        if abs(gap) * 2 <= step:
            break
        if gap > 0:
            cands = [j for j in range(len(widths)) if can_shrink(j)]
            if not cands:
                break
            j = max(cands, key=lambda j: widths[j] - target[j])
            widths[j] -= step
        else:
            cands = [j for j in range(len(widths)) if can_grow(j)]
            if not cands:
                break
            j = max(cands, key=lambda j: target[j] - widths[j])
            widths[j] = min(widths[j] + step, current[j])
    return widths


@dataclass
class LayerCosts:
    """Cumulative saliency of removing the k least salient attention units / MLP channels of a layer."""

    attention: torch.Tensor  # [units_now]: cost of removing 0..units_now-1 more units
    mlp: torch.Tensor  # [width_now]: cost of removing 0..width_now-1 more channels


def _cheapest_attention_keep(costs: LayerCosts, units_now: int, units_orig: int, per_unit: int,
                             want_removed: float, mlp_removed: int, per_channel: int, width_now: int) -> int:
    """Attention units to keep so that the layer's removal budget costs the least total saliency."""
    best, best_cost = units_now, float("inf")
    for keep in range(units_now, 0, -1):
        extra_units = units_now - keep
        attn_params = (units_orig - keep) * per_unit
        if extra_units > 0 and attn_params > want_removed + per_unit / 2:
            break  # attention alone would overshoot the layer's budget by more than half a unit
        channels = int(round((want_removed - attn_params) / per_channel)) - mlp_removed
        channels = min(max(channels, 0), width_now - 1)
        cost = float(costs.attention[extra_units]) + float(costs.mlp[channels])
        if cost < best_cost:
            best, best_cost = keep, cost
    return best


def plan_budgets(
    adapter: DecoderAdapter,
    original: list[LayerShape],
    original_prunable: int,
    target_prunable: int,
    importance: torch.Tensor,
    amplitude: float,
    mode: str,
    round_to: int = 1,
    costs: list[LayerCosts] | None = None,
    sparsity: torch.Tensor | None = None,
) -> tuple[list[LayerBudget], torch.Tensor]:
    """Per-layer widths for one sub-step that bring the prunable parameters to ``target_prunable``.

    With ``costs`` (saliency split), each layer removes the attention units whose saliency is lower than
    that of the MLP channels they would spare; without, attention takes its proportional share.
    ``sparsity`` overrides the per-layer targets (else Eq. 6 from ``importance`` and ``amplitude``).
    Returns the budgets and the per-layer sparsities ``S_j`` that shaped them.
    """
    n = len(adapter.layers)
    current = adapter.shapes()
    s_cur = 1.0 - target_prunable / original_prunable
    if sparsity is None:
        sparsity = layer_sparsities(s_cur, importance, amplitude)

    orig_layer_params = [_layer_params(adapter, j, original[j], mode) for j in range(n)]
    units_keep: list[int] = []
    attn_removed: list[int] = []  # parameters removed from attention so far, per layer
    for j in range(n):
        per_unit = _params_per_unit(adapter, j, original[j], mode)
        units_orig = _attention_units(original[j], mode)
        units_now = _attention_units(current[j], mode)
        want_removed = float(sparsity[j]) * orig_layer_params[j]
        # Attention takes the share closest to the layer's sparsity, but at most what keeps one unit.
        if costs is not None:
            keep = _cheapest_attention_keep(costs[j], units_now, units_orig, per_unit, want_removed,
                                            original[j].intermediate_size - current[j].intermediate_size,
                                            adapter.params_per_channel(j), current[j].intermediate_size)
        else:
            keep = units_orig - int(round(float(sparsity[j]) * units_orig))
            keep = max(1, min(units_now, keep))
            # Do not let coarse attention overshoot the layer's whole budget by more than half a unit.
            while keep < units_now and (units_orig - keep) * per_unit > want_removed + per_unit / 2:
                keep += 1
        units_keep.append(keep)
        attn_removed.append((units_orig - keep) * per_unit)

    chan = [adapter.params_per_channel(j) for j in range(n)]
    orig_mlp = [s.intermediate_size for s in original]
    cur_mlp = [s.intermediate_size for s in current]

    def mlp_plan() -> list[int]:
        need = original_prunable - target_prunable - sum(attn_removed)  # params still to remove
        total_keep = sum(orig_mlp) - int(round(need / (sum(chan) / n)))
        desired = [
            max(0.0, (float(sparsity[j]) * orig_layer_params[j] - attn_removed[j]) / chan[j]) for j in range(n)
        ]
        return apportion_mlp(desired, cur_mlp, orig_mlp, total_keep, round_to)

    widths = mlp_plan()
    # If MLP alone cannot reach the target (every layer at its floor), take more attention units from the
    # layers with the highest sparsity and re-apportion.
    while _prunable_after(adapter, original, units_keep, widths, mode) > target_prunable + max(chan) * max(
        round_to, 1
    ):
        order = sorted(range(n), key=lambda j: -float(sparsity[j]))
        for j in order:
            if units_keep[j] > 1:
                units_keep[j] -= 1
                attn_removed[j] += _params_per_unit(adapter, j, original[j], mode)
                break
        else:
            break  # nothing left to take: the caller reports the shortfall
        widths = mlp_plan()
    budgets = [LayerBudget(units_keep[j], widths[j]) for j in range(n)]
    return budgets, sparsity


def _layer_params(adapter: DecoderAdapter, j: int, shape: LayerShape, mode: str) -> int:
    """Prunable parameters of layer j if it had ``shape``."""
    units = _attention_units(shape, mode)
    mlp = shape.intermediate_size * adapter.params_per_channel(j)
    fixed = _attention_fixed(adapter, j, shape, mode)
    return units * _params_per_unit(adapter, j, shape, mode) + fixed + mlp + _mlp_fixed(adapter, j)


def _attention_fixed(adapter: DecoderAdapter, j: int, shape: LayerShape, mode: str) -> int:
    """Attention parameters not covered by units: K/V in query mode, and o_proj's bias."""
    _, _, _, o = adapter.attention_projections(adapter.layers[j])
    fixed = o.bias.numel() if o.bias is not None else 0
    if mode == "query":
        fixed += shape.num_kv_heads * adapter.params_per_kv_head(j)
    return fixed


def _mlp_fixed(adapter: DecoderAdapter, j: int) -> int:
    _, _, down = adapter.mlp_projections(adapter.layers[j])
    return down.bias.numel() if down.bias is not None else 0


def _prunable_after(
    adapter: DecoderAdapter, original: list[LayerShape], units: list[int], widths: list[int], mode: str
) -> int:
    total = 0
    for j, (u, w) in enumerate(zip(units, widths)):
        o = original[j]
        if mode == "query":
            shape = LayerShape(u * o.num_kv_heads, o.num_kv_heads, w)
        else:
            shape = LayerShape(u * (o.num_heads // o.num_kv_heads), u, w)
        total += _layer_params(adapter, j, shape, mode)
    return total


def budget_shape(original: LayerShape, budget: LayerBudget, mode: str) -> LayerShape:
    """The layer shape a budget describes."""
    if mode == "query":
        return LayerShape(budget.attention_units * original.num_kv_heads, original.num_kv_heads,
                          budget.intermediate_size)
    n_rep = original.num_heads // original.num_kv_heads
    return LayerShape(budget.attention_units * n_rep, budget.attention_units, budget.intermediate_size)


def step_targets(start: int, end: int, steps: int) -> list[int]:
    """Parameter targets of ``steps`` equal sub-steps from ``start`` down to ``end`` (S_cur = S·i/T)."""
    return [int(math.floor(start - (start - end) * i / steps + 0.5)) for i in range(1, steps + 1)]
