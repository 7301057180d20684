"""One global choice among group types (``--allocation global``, EfficientLLM §3): rank every removable group of
the allowed types (``--groups heads,mlp,stem``) by saliency per parameter and remove the cheapest first until the
sub-step's parameter target is met.

Candidates (each is removed whole):

* ``heads``: an attention unit of one layer (``--attention query``: the r-th cheapest query head of every KV group
  of the layer, so stock GQA stays valid; ``kv``: a whole KV group). A layer keeps at least one unit.
* ``mlp``: one MLP channel of one layer; a layer keeps at least one.
* ``stem``: a block of ``m`` hidden channels (the cheapest remaining ones), ``m`` = 1 except where the family's
  config insists on ``hidden_size % num_attention_heads == 0`` (``DecoderAdapter.hidden_multiple``).

With ``--uniform-shape`` the heads and mlp candidates are *slices*: the r-th cheapest unit (channel) of every layer
at once, so all layers keep the same shape.

**Normalisation**: a candidate's priority is its summed saliency (the group score, e.g. Σ|g⊙w| over every weight
it spans) divided by the number of parameters removing it alone would remove, counted at the shapes the model has
at the start of the sub-step (a stem channel's count includes its column/row in every projection, the embedding,
an untied LM head and the norms; an MLP channel's counts its gate/up rows and down column at the current hidden
size). Candidates are taken in increasing priority; one that would take the model below the target is skipped
(and with it the rest of its own sequence, which is never cheaper), so the result lands at or above the target,
within the size of the smallest group still removable (one MLP channel when mlp is allowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import DecoderAdapter, LayerShape, count_params
from .groups import GroupScores, LayerKeep, choose_attention_keep, choose_mlp_keep

HEADS, MLP_TYPE, STEM_TYPE = "heads", "mlp", "stem"


@dataclass
class _LayerTerms:
    """What one layer's parameter count is made of (biases present or not)."""

    head_dim: int
    q_bias: int
    kv_bias: int
    o_bias: int
    gate_up_bias: int
    down_bias: int


class SizeModel:
    """Exact parameter count of the model as a function of its hidden size and per-layer widths.

    ``total = other + H·(vectors + Σ_j [2d·(q_j + kv_j) + o_bias_j + 3·I_j + down_bias_j]) + Σ_j [q_bias·d·q_j +
    2·kv_bias·d·kv_j + gate_up_bias·I_j]``, where ``vectors`` counts the hidden-size vectors outside the projections
    (embedding rows, an untied LM head's rows, norm weights and biases) and ``other`` is everything the hidden size
    does not touch (per-head q/k norms), read off the model as the remainder.
    """

    def __init__(self, adapter: DecoderAdapter):
        self.adapter = adapter
        self.terms = []
        for layer in adapter.layers:
            q, k, _, o = adapter.attention_projections(layer)
            gate, up, down = adapter.mlp_projections(layer)
            gate_up = int(gate.bias is not None) + int(up.bias is not None)
            self.terms.append(_LayerTerms(adapter.head_dim, int(q.bias is not None), int(k.bias is not None),
                                          int(o.bias is not None), gate_up, int(down.bias is not None)))
        projections = {id(p) for layer in adapter.layers
                       for lin in (*adapter.attention_projections(layer), *adapter.mlp_projections(layer))
                       for p in lin.parameters()}
        self.vectors = sum(p.numel() // p.shape[dim] for p, dim in adapter.stem_members() if id(p) not in projections)
        self.other = 0
        self.other = count_params(adapter.model) - self.total(adapter.hidden_size, adapter.shapes())

    def layer_coefficients(self, j: int, shape: LayerShape) -> tuple[int, int]:
        """(parameters per hidden channel, parameters independent of the hidden size) of layer j's projections."""
        t = self.terms[j]
        has_attn = shape.num_heads > 0
        per_h = (2 * t.head_dim * (shape.num_heads + shape.num_kv_heads) + t.o_bias * has_attn
                 + 3 * shape.intermediate_size + t.down_bias)
        fixed = (t.q_bias * t.head_dim * shape.num_heads + 2 * t.kv_bias * t.head_dim * shape.num_kv_heads
                 + t.gate_up_bias * shape.intermediate_size)
        return per_h, fixed

    def total(self, hidden: int, shapes: list[LayerShape]) -> int:
        """Parameters of the model at hidden size ``hidden`` and layer widths ``shapes``."""
        per_h, fixed = self.vectors, self.other
        for j, s in enumerate(shapes):
            a, b = self.layer_coefficients(j, s)
            per_h += a
            fixed += b
        return hidden * per_h + fixed


@dataclass
class GlobalPlan:
    """What one global sub-step removes: per-layer keeps, the hidden channels kept, and the removal record."""

    layers: list[LayerKeep]
    stem_keep: torch.Tensor | None
    shapes: list[LayerShape]
    hidden_size: int
    params: int
    removed_params: dict[str, int] = field(default_factory=dict)
    removal_order: list[list] = field(default_factory=list)  # [[type, groups removed in a row], ...]


@dataclass
class _Candidate:
    priority: float
    kind: str
    seq: int  # candidates of one sequence are taken in order; a skipped one closes its sequence
    layers: tuple[int, ...]  # layers touched (all of them for a uniform slice; none for stem)


def _unit_costs(scores: GroupScores, j: int, shape: LayerShape, mode: str) -> torch.Tensor:
    """Cost of removing a layer's attention units in order, cheapest first (its last unit excluded)."""
    if shape.num_heads == 0:
        return torch.zeros(0, dtype=torch.float64)  # attention already removed (--deploy-target vllm)
    q = scores.q_heads[j].double().cpu().view(shape.num_kv_heads, -1)
    if mode == "query":
        unit = q.sort(dim=1).values.sum(0)  # r-th unit = r-th cheapest query head of every KV group
    else:
        unit = (q.sum(1) + scores.kv_heads[j].double().cpu()).sort().values
    return unit[:-1]


def _unit_shape(shape: LayerShape, mode: str, units: int) -> LayerShape:
    """Layer shape after removing ``units`` attention units."""
    n_rep = shape.num_heads // shape.num_kv_heads
    if mode == "query":
        return LayerShape(shape.num_heads - units * shape.num_kv_heads, shape.num_kv_heads, shape.intermediate_size)
    return LayerShape(shape.num_heads - units * n_rep, shape.num_kv_heads - units, shape.intermediate_size)


def _mlp_shape(shape: LayerShape, channels: int) -> LayerShape:
    """Layer shape after removing ``channels`` MLP channels."""
    return LayerShape(shape.num_heads, shape.num_kv_heads, shape.intermediate_size - channels)


def plan_global(adapter: DecoderAdapter, scores: GroupScores, target: int, groups: tuple[str, ...], mode: str,
                uniform: bool, size: SizeModel | None = None, max_groups: int | None = None) -> GlobalPlan:
    """Remove the groups of ``groups`` with the least saliency per parameter until the model has ``target``
    parameters or just above (see the module docstring for the exact normalisation), or, with ``max_groups``,
    after that many candidates (one slice of ``accel --prune-every``), whichever comes first."""
    size = size or SizeModel(adapter)
    shapes = adapter.shapes()
    n = len(shapes)
    hidden = adapter.hidden_size
    multiple = stem_multiple(adapter, shapes, mode, uniform)
    base = size.total(hidden, shapes)

    def removed_alone(new_hidden: int, new_shapes: list[LayerShape]) -> int:
        return base - size.total(new_hidden, new_shapes)

    cands: list[_Candidate] = []
    seq = 0
    if HEADS in groups:
        costs = [_unit_costs(scores, j, s, mode) for j, s in enumerate(shapes)]
        if uniform:
            depth = min(len(c) for c in costs)
            for r in range(depth):
                cost = sum(float(c[r]) for c in costs)
                params = removed_alone(hidden, [_unit_shape(s, mode, 1) for s in shapes])
                cands.append(_Candidate(cost / params, HEADS, seq, tuple(range(n))))
        else:
            for j, c in enumerate(costs):
                params = removed_alone(hidden, [_unit_shape(s, mode, 1) if i == j else s for i, s in enumerate(shapes)])
                cands += [_Candidate(float(x) / params, HEADS, seq, (j,)) for x in c]
                seq += 1
        seq += 1
    if MLP_TYPE in groups:
        sorted_mlp = [scores.mlp[j].double().cpu().sort().values[:-1] for j in range(n)]  # a layer keeps one
        if uniform:
            depth = min(len(c) for c in sorted_mlp)
            params = removed_alone(hidden, [_mlp_shape(s, 1) for s in shapes])
            cands += [_Candidate(float(sum(c[r] for c in sorted_mlp)) / params, MLP_TYPE, seq, tuple(range(n)))
                      for r in range(depth)]
        else:
            for j, c in enumerate(sorted_mlp):
                params = removed_alone(hidden, [_mlp_shape(s, 1) if i == j else s for i, s in enumerate(shapes)])
                cands += [_Candidate(float(x) / params, MLP_TYPE, seq, (j,)) for x in c.tolist()]
                seq += 1
        seq += 1
    stem_order = None
    if STEM_TYPE in groups:
        if scores.stem is None:
            raise ValueError("--groups stem needs stem saliency scores (a calibration pass with stem=True)")
        stem_order = scores.stem.double().cpu().sort().indices
        blocks = scores.stem.double().cpu()[stem_order].view(-1, multiple).sum(1)[:-1]  # keep one block
        params = removed_alone(hidden - multiple, shapes)
        cands += [_Candidate(float(x) / params, STEM_TYPE, seq, ()) for x in blocks.tolist()]
    # Stable sort: equal priorities keep the type order heads, mlp, stem and each sequence's own order.
    cands.sort(key=lambda c: c.priority)

    # Greedy first-fit with the exact size model, updated in O(1) per candidate.
    units = [0] * n
    mlp_removed = [0] * n
    stem_blocks = 0
    per_h = size.vectors + sum(size.layer_coefficients(j, s)[0] for j, s in enumerate(shapes))
    fixed = size.other + sum(size.layer_coefficients(j, s)[1] for j, s in enumerate(shapes))
    cur = [LayerShape(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes]
    total = hidden * per_h + fixed
    closed: set[int] = set()
    removed = {t: 0 for t in groups}
    order: list[list] = []
    taken = 0
    for c in cands:
        if total <= target or (max_groups is not None and taken >= max_groups):
            break
        if c.seq in closed:
            continue
        h_new, d_per_h, d_fixed, new_shapes = hidden - multiple * stem_blocks, 0, 0, {}
        if c.kind == STEM_TYPE:
            h_new -= multiple
        else:
            for j in c.layers:
                s = cur[j]
                new = _unit_shape(s, mode, 1) if c.kind == HEADS else _mlp_shape(s, 1)
                a0, b0 = size.layer_coefficients(j, s)
                a1, b1 = size.layer_coefficients(j, new)
                d_per_h += a1 - a0
                d_fixed += b1 - b0
                new_shapes[j] = new
        new_total = h_new * (per_h + d_per_h) + fixed + d_fixed
        if new_total < target:
            closed.add(c.seq)  # too big for what is left: neither it nor its dearer successors fit
            continue
        removed[c.kind] += total - new_total
        taken += 1
        total, per_h, fixed = new_total, per_h + d_per_h, fixed + d_fixed
        for j, s in new_shapes.items():
            cur[j] = s
            if c.kind == HEADS:
                units[j] += 1
            else:
                mlp_removed[j] += 1
        if c.kind == STEM_TYPE:
            stem_blocks += 1
        if order and order[-1][0] == c.kind:
            order[-1][1] += 1
        else:
            order.append([c.kind, 1])

    plan = []
    for j, s in enumerate(shapes):
        keep = LayerKeep()
        if units[j]:
            kept = (s.num_heads // s.num_kv_heads if mode == "query" else s.num_kv_heads) - units[j]
            keep.q_heads, kv = choose_attention_keep(scores.q_heads[j], scores.kv_heads[j], s.num_kv_heads, kept, mode)
            if mode == "kv":
                keep.kv_heads = kv
        if mlp_removed[j]:
            keep.mlp = choose_mlp_keep(scores.mlp[j], s.intermediate_size - mlp_removed[j])
        plan.append(keep)
    stem_keep = None
    new_hidden = hidden - multiple * stem_blocks
    if stem_blocks:
        stem_keep = stem_order[multiple * stem_blocks:].sort().values
    return GlobalPlan(plan, stem_keep, cur, new_hidden, total, removed, order)


def stem_multiple(adapter: DecoderAdapter, shapes: list[LayerShape], mode: str, uniform: bool) -> int:
    """Hidden channels removed together: the lcm of the head counts the model's config may be saved with (its
    ``num_attention_heads``, and under ``--uniform-shape`` every head count a layer can still reach) for families
    whose config checks ``hidden_size % num_attention_heads``; 1 for the others."""
    counts = [adapter.config.num_attention_heads]
    if uniform:
        s = shapes[0]
        n_rep = s.num_heads // s.num_kv_heads
        counts += ([s.num_kv_heads * u for u in range(1, n_rep + 1)] if mode == "query"
                   else [n_rep * u for u in range(1, s.num_kv_heads + 1)])
    multiple = adapter.hidden_multiple(counts)
    if adapter.hidden_size % multiple:
        raise ValueError(f"hidden size {adapter.hidden_size} is not a multiple of {multiple}")
    return multiple


def floor_params(adapter: DecoderAdapter, groups: tuple[str, ...], mode: str, uniform: bool) -> int:
    """Smallest size global allocation can reach: one attention unit and one MLP channel per layer, one stem
    block, for the allowed types (the others as they are now)."""
    size = SizeModel(adapter)
    shapes = adapter.shapes()
    out = []
    for s in shapes:
        if HEADS in groups and s.num_heads:
            units = s.num_heads // s.num_kv_heads if mode == "query" else s.num_kv_heads
            s = _unit_shape(s, mode, units - 1)
        if MLP_TYPE in groups:
            s = LayerShape(s.num_heads, s.num_kv_heads, 1)
        out.append(s)
    hidden = stem_multiple(adapter, shapes, mode, uniform) if STEM_TYPE in groups else adapter.hidden_size
    return size.total(hidden, out)
