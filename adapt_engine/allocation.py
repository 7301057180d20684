"""Per-layer sparsity (Adapt-Pruner Eq. 6) and the parameter accounting that turns it into widths.

Layer j's sparsity is ``S_j = clip(S_cur − A·I_j, 0, 0.99)`` of its *original* prunable parameters,
with ``I`` normalised to mean 0 and max |I| = 1 (A = 0 is uniform, LLM-Pruner-style, pruning). That is
the paper's Eq. 6 (``--layer-update absolute``). The authors' code instead moves each layer's sparsity
by the step's overall increment, ``s_j ← clip(s_j + ΔS − A·I_j, 0, 0.99)`` (``--layer-update
incremental``, the default), so a layer that stays (un)important drifts further at every sub-step.
Attention comes in coarse rungs (a query head per KV group, a whole KV group, or for vLLM merged KV heads
and whole attention sub-layers: ``attention_ladder``), so each layer first takes the rung closest to its
share, and MLP channels — fine-grained — absorb the rest.
A final apportionment moves MLP channels between layers so the whole model lands on the requested
parameter count to within half an MLP channel (``3·hidden`` parameters), or half of ``round_to``
channels when widths must be multiples of ``round_to``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters import DecoderAdapter, LayerShape
from .attention_ladder import attention_params, proportional_rung, rungs, shape_at, units_of

MAX_LAYER_SPARSITY = 0.99


@dataclass
class LayerBudget:
    """Target widths of one layer after a pruning sub-step."""

    attention_units: int  # rung of the attention ladder: units kept (see attention_ladder)
    intermediate_size: int


def layer_sparsities(current: float, importance: torch.Tensor, amplitude: float) -> torch.Tensor:
    """``clip(S_cur − A·I_j, 0, 0.99)`` per layer."""
    return (current - amplitude * importance).clamp(0.0, MAX_LAYER_SPARSITY)


def incremental_sparsities(previous: torch.Tensor, increment: float, importance: torch.Tensor,
                           amplitude: float) -> torch.Tensor:
    """``clip(s_j + ΔS − A·I_j, 0, 0.99)`` per layer: the authors' code's per-sub-step update."""
    return (previous + increment - amplitude * importance).clamp(0.0, MAX_LAYER_SPARSITY)


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
    frozen: frozenset[int] = frozenset(),
) -> list[int]:
    """Integer MLP widths near ``original − desired_removed`` that sum as closely as possible to
    ``total_keep``, never wider than ``current`` (pruning is monotone) and at least ``round_to``
    (or 1) channels per layer; the ``frozen`` layers keep their current width."""
    step = max(round_to, 1)
    floor_w = [c if j in frozen else min(c, step) for j, c in enumerate(current)]
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
    """Saliency lost by each attention rung a layer may go to, and by removing its k least salient MLP channels."""

    attention: dict[int, float]  # rung (units kept) -> saliency lost (see attention_ladder.rung_costs)
    mlp: torch.Tensor  # [width_now]: cost of removing 0..width_now-1 more channels


def _cheapest_rung(costs: LayerCosts, ladder: list[int], removed: dict[int, int], want_removed: float,
                   mlp_removed: int, per_channel: int, width_now: int) -> int:
    """Attention rung to keep so that the layer's removal budget costs the least total saliency."""
    best, best_cost = ladder[0], float("inf")
    for i, keep in enumerate(ladder):
        attn_params = removed[keep]
        if i > 0 and attn_params > want_removed + (attn_params - removed[ladder[i - 1]]) / 2:
            break  # attention alone would overshoot the layer's budget by more than half a rung
        channels = int(round((want_removed - attn_params) / per_channel)) - mlp_removed
        channels = min(max(channels, 0), width_now - 1)
        cost = costs.attention[keep] + float(costs.mlp[channels])
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
    frozen: frozenset[int] = frozenset(),
) -> tuple[list[LayerBudget], torch.Tensor]:
    """Per-layer widths for one sub-step that bring the prunable parameters to ``target_prunable``.

    ``mode`` is the attention ladder (``attention_ladder``). With ``costs`` (saliency split), each layer goes
    down its ladder only where the attention saliency lost is lower than that of the MLP channels it spares;
    without, attention takes its proportional share. ``sparsity`` overrides the per-layer targets (else Eq. 6
    from ``importance`` and ``amplitude``). The ``frozen`` layers (``--layers`` left them out) keep their current
    widths, so the others absorb the whole target. Returns the budgets and the per-layer sparsities ``S_j``.
    """
    n = len(adapter.layers)
    current = adapter.shapes()
    s_cur = 1.0 - target_prunable / original_prunable
    if sparsity is None:
        sparsity = layer_sparsities(s_cur, importance, amplitude)

    orig_layer_params = [_layer_params(adapter, j, original[j], units_of(original[j], mode),
                                       original[j].intermediate_size, mode) for j in range(n)]
    ladders = [rungs(current[j], mode, j) for j in range(n)]
    full_attn = [attention_params(adapter, j, original[j], units_of(original[j], mode), mode) for j in range(n)]

    def removed_at(j: int, units: int) -> int:
        """Attention parameters layer j has lost at ``units`` units, against its original."""
        return full_attn[j] - attention_params(adapter, j, original[j], units, mode)

    units_keep: list[int] = []
    attn_removed: list[int] = []  # parameters removed from attention so far, per layer
    for j in range(n):
        ladder = ladders[j]
        removed = {r: removed_at(j, r) for r in ladder}
        want_removed = float(sparsity[j]) * orig_layer_params[j]
        if j in frozen:
            keep = ladder[0]  # the current rung: a frozen layer is left as it is
        elif costs is not None:
            keep = _cheapest_rung(costs[j], ladder, removed, want_removed,
                                  original[j].intermediate_size - current[j].intermediate_size,
                                  adapter.params_per_channel(j), current[j].intermediate_size)
        else:
            keep = proportional_rung(adapter, j, original[j], ladder, mode, float(sparsity[j]))
            # Do not let coarse attention overshoot the layer's whole budget by more than half a rung.
            i = ladder.index(keep)
            while i > 0 and removed[ladder[i]] > want_removed + (removed[ladder[i]] - removed[ladder[i - 1]]) / 2:
                i -= 1
            keep = ladder[i]
        units_keep.append(keep)
        attn_removed.append(removed[keep])

    chan = [adapter.params_per_channel(j) for j in range(n)]
    orig_mlp = [s.intermediate_size for s in original]
    cur_mlp = [s.intermediate_size for s in current]

    def mlp_plan() -> list[int]:
        need = original_prunable - target_prunable - sum(attn_removed)  # params still to remove
        total_keep = sum(orig_mlp) - int(round(need / (sum(chan) / n)))
        desired = [
            max(0.0, (float(sparsity[j]) * orig_layer_params[j] - attn_removed[j]) / chan[j]) for j in range(n)
        ]
        return apportion_mlp(desired, cur_mlp, orig_mlp, total_keep, round_to, frozen)

    widths = mlp_plan()
    # If MLP alone cannot reach the target (every layer at its floor), take the next rung of attention from the
    # layers with the highest sparsity and re-apportion.
    while _prunable_after(adapter, original, units_keep, widths, mode) > target_prunable + max(chan) * max(
        round_to, 1
    ):
        order = sorted((j for j in range(n) if j not in frozen), key=lambda j: -float(sparsity[j]))
        for j in order:
            i = ladders[j].index(units_keep[j])
            if i + 1 < len(ladders[j]):
                units_keep[j] = ladders[j][i + 1]
                attn_removed[j] = removed_at(j, units_keep[j])
                break
        else:
            break  # nothing left to take: the caller reports the shortfall
        widths = mlp_plan()
    budgets = [LayerBudget(units_keep[j], widths[j]) for j in range(n)]
    return budgets, sparsity


def _layer_params(adapter: DecoderAdapter, j: int, original: LayerShape, units: int, intermediate: int,
                  mode: str) -> int:
    """Prunable parameters of layer j with ``units`` attention units and ``intermediate`` MLP channels."""
    return (attention_params(adapter, j, original, units, mode) + intermediate * adapter.params_per_channel(j)
            + _mlp_fixed(adapter, j))


def _mlp_fixed(adapter: DecoderAdapter, j: int) -> int:
    _, _, down = adapter.mlp_projections(adapter.layers[j])
    return down.bias.numel() if down.bias is not None else 0


def _prunable_after(
    adapter: DecoderAdapter, original: list[LayerShape], units: list[int], widths: list[int], mode: str
) -> int:
    return sum(_layer_params(adapter, j, original[j], u, w, mode) for j, (u, w) in enumerate(zip(units, widths)))


def budget_shape(original: LayerShape, budget: LayerBudget, mode: str) -> LayerShape:
    """The layer shape a budget describes."""
    return shape_at(original, budget.attention_units, mode, budget.intermediate_size)


def step_targets(start: int, end: int, steps: int) -> list[int]:
    """Parameter targets of ``steps`` equal sub-steps from ``start`` down to ``end`` (S_cur = S·i/T)."""
    return [int(math.floor(start - (start - end) * i / steps + 0.5)) for i in range(1, steps + 1)]
