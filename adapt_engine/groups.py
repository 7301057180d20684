"""Coupled weight groups, written out explicitly (no autograd tracing).

Tracing through ``repeat_kv`` is what breaks other pruning tools on every transformers release, so the
groups are declared here from the module structure instead:

* **query head** h of a layer: rows ``h*d:(h+1)*d`` of q_proj (+bias) and the same columns of o_proj.
* **KV head** j: rows ``j*d:(j+1)*d`` of k_proj and v_proj (+biases). Query heads
  ``j*n_rep:(j+1)*n_rep`` attend through it (the layout ``repeat_kv`` assumes).
* **MLP channel** i: row i of gate_proj and up_proj (+biases) and column i of down_proj.

Attention granularity (``--attention``):

* ``query`` (default): every KV group drops the *same number* of its least salient query heads, so all
  groups keep equal size and stock GQA attention (``num_key_value_groups``) stays valid. One unit
  removes one query head per KV group. It is finer than dropping whole KV groups when there are few
  KV heads (SmolLM2 has 3), and KV heads are kept, so the KV cache is unchanged.
* ``kv``: whole KV groups (the KV head and all of its query heads) are removed. Coarser, but it also
  shrinks K/V and the KV cache.
* ``merge`` (``--deploy-target vllm``, see ``attention_ladder``): adjacent KV heads are merged into one
  (``--kv-merge``), every query head is kept, or the whole attention sub-layer goes.

Per-head q_norm/k_norm (Qwen3) act on ``head_dim`` and are shared across heads: never sliced.

* **stem channel** c (``--groups ...,stem``, EfficientLLM): hidden channel c of the residual stream in every
  layer at once — column c of the embedding (and of an untied LM head), input column c of q/k/v/gate/up, output
  row c (and bias element) of o/down, element c of every hidden-size norm (``DecoderAdapter.stem_members``).
  One score vector for the whole model, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import DecoderAdapter, LayerShape
from .args import AGGREGATES, ATTENTION_MODES, KV_MERGES, MERGE

# Score buckets per layer.
Q_HEADS, KV_HEADS, MLP = "q_heads", "kv_heads", "mlp"
STEM = "stem"  # one bucket for the whole model (its Member.layer is -1)


@dataclass(frozen=True)
class Member:
    """One tensor of a coupled group: which layer/bucket it scores and along which dim."""

    layer: int
    bucket: str
    dim: int
    group_size: int


def group_members(adapter: DecoderAdapter) -> dict[nn.Parameter, Member]:
    """Every prunable parameter mapped to the group bucket its saliency feeds."""
    d = adapter.head_dim
    members: dict[nn.Parameter, Member] = {}
    for i, layer in enumerate(adapter.layers):
        q, k, v, o = adapter.attention_projections(layer)
        gate, up, down = adapter.mlp_projections(layer)
        attention = ((q, Q_HEADS, 0, d), (k, KV_HEADS, 0, d), (v, KV_HEADS, 0, d), (o, Q_HEADS, 1, d))
        if q.out_features == 0:
            attention = ()  # a layer whose attention was removed has nothing left to score
        for lin, bucket, dim, gs in (*attention, (gate, MLP, 0, 1), (up, MLP, 0, 1), (down, MLP, 1, 1)):
            members[lin.weight] = Member(i, bucket, dim, gs)
            # A bias belongs to the group only when it is indexed by the pruned dimension (q/k/v/gate/up).
            if lin.bias is not None and dim == 0:
                members[lin.bias] = Member(i, bucket, 0, gs)
    return members


def stem_members(adapter: DecoderAdapter) -> dict[nn.Parameter, Member]:
    """Every tensor a hidden channel spans, mapped to the stem bucket (scored along its hidden dim)."""
    return {p: Member(-1, STEM, dim, 1) for p, dim in adapter.stem_members()}


TapTargets = dict[nn.Parameter, list[tuple[torch.Tensor, int, int]]]  # param -> [(score vector, dim, group size)]


def tap_targets(adapter: DecoderAdapter, scores: GroupScores) -> TapTargets:
    """Every prunable parameter mapped to the (score vector, pruned dim, group size) entries the optimizer's
    saliency tap adds ``Σ|w ⊙ g|`` into: its head or MLP channel, and, when ``scores`` has a stem vector, the
    hidden channels along its other dim (embedding, norms and an untied LM head feed the stem alone)."""
    out: TapTargets = {}
    members = [group_members(adapter)] + ([stem_members(adapter)] if scores.stem is not None else [])
    for table in members:
        for p, m in table.items():
            out.setdefault(p, []).append((scores.bucket(m.layer, m.bucket), m.dim, m.group_size))
    return out


@dataclass
class GroupScores:
    """Saliency per group: for each layer, per query head, per KV head (K/V alone), per MLP channel; and, when
    stem channels are scored, one vector over the hidden size."""

    q_heads: list[torch.Tensor] = field(default_factory=list)
    kv_heads: list[torch.Tensor] = field(default_factory=list)
    mlp: list[torch.Tensor] = field(default_factory=list)
    stem: torch.Tensor | None = None

    @classmethod
    def zeros(cls, adapter: DecoderAdapter, device: torch.device | str = "cpu", stem: bool = False) -> GroupScores:
        """Zero scores shaped like the model's current layers (and hidden size, with ``stem``)."""
        out = cls()
        for s in adapter.shapes():
            out.q_heads.append(torch.zeros(s.num_heads, dtype=torch.float32, device=device))
            out.kv_heads.append(torch.zeros(s.num_kv_heads, dtype=torch.float32, device=device))
            out.mlp.append(torch.zeros(s.intermediate_size, dtype=torch.float32, device=device))
        if stem:
            out.stem = torch.zeros(adapter.hidden_size, dtype=torch.float32, device=device)
        return out

    def bucket(self, layer: int, name: str) -> torch.Tensor:
        """The score vector of one bucket of one layer (the stem bucket is the model's)."""
        if name == STEM:
            return self.stem
        return getattr(self, name)[layer]

    def all_tensors(self) -> list[torch.Tensor]:
        """Every score vector (for cross-rank reduction)."""
        return [*self.q_heads, *self.kv_heads, *self.mlp, *([self.stem] if self.stem is not None else [])]


def member_groups(param: nn.Parameter, member: Member) -> int:
    """How many groups one member tensor scores (its length along the pruned dim over the group size)."""
    return param.shape[member.dim] // member.group_size


def aggregate_members(adapter: DecoderAdapter, members: dict[nn.Parameter, Member],
                      per_member: dict[nn.Parameter, torch.Tensor], how: str) -> GroupScores:
    """Group scores from each member tensor's own per-group scores, combined over a group's members (LLM-Pruner's
    aggregation): ``sum``, ``prod`` (in float64, then float32), ``max``, or ``last`` = the score of the group's
    last member in :func:`group_members` order (o_proj columns for a query head, v_proj rows (its bias if any)
    for a KV head, down_proj columns for an MLP channel)."""
    if how not in AGGREGATES:
        raise ValueError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got '{how}'")
    combined: dict[tuple[int, str], torch.Tensor] = {}
    for param, m in members.items():
        score = per_member[param].double()
        key = (m.layer, m.bucket)
        if key not in combined or how == "last":
            combined[key] = score.clone()
        elif how == "sum":
            combined[key] += score
        elif how == "prod":
            combined[key] *= score
        else:
            combined[key] = torch.maximum(combined[key], score)
    out = GroupScores.zeros(adapter, device=next(iter(per_member.values())).device if per_member else "cpu")
    for (layer, bucket), score in combined.items():
        out.bucket(layer, bucket).copy_(score)
    return out


@dataclass
class LayerKeep:
    """Sorted indices to keep in one layer; ``None`` means the part is left as it is.

    Empty ``q_heads`` and ``kv_heads`` remove the layer's attention entirely. ``kv_merge`` (``[new, current]``
    weights) replaces the K/V heads by weighted sums of them instead; query heads then stay.
    """

    q_heads: torch.Tensor | None = None
    kv_heads: torch.Tensor | None = None
    mlp: torch.Tensor | None = None
    kv_merge: torch.Tensor | None = None

    def removes_nothing(self) -> bool:
        """Whether the layer is left exactly as it is."""
        return all(x is None for x in (self.q_heads, self.kv_heads, self.mlp, self.kv_merge))


def choose_attention_keep(
    q_scores: torch.Tensor, kv_scores: torch.Tensor, num_kv: int, keep_units: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and KV heads to keep in one layer, given how many attention units survive.

    In ``query`` mode ``keep_units`` is the number of query heads each KV group keeps; in ``kv``
    mode it is the number of KV groups kept.
    """
    n_q = q_scores.numel()
    n_rep = n_q // num_kv
    if mode == "query":
        per_group = q_scores.view(num_kv, n_rep)
        top = per_group.topk(keep_units, dim=1).indices.sort(dim=1).values
        q_keep = (top + torch.arange(num_kv, device=top.device)[:, None] * n_rep).flatten()
        kv_keep = torch.arange(num_kv, device=q_scores.device)
    elif mode == "kv":
        group_score = q_scores.view(num_kv, n_rep).sum(1) + kv_scores
        kv_keep = group_score.topk(keep_units).indices.sort().values
        q_keep = (kv_keep[:, None] * n_rep + torch.arange(n_rep, device=kv_keep.device)).flatten()
    else:
        raise ValueError(f"attention granularity must be one of {ATTENTION_MODES}, got '{mode}'")
    return q_keep, kv_keep


def choose_kv_merge(kv_scores: torch.Tensor, new_kv: int, how: str) -> torch.Tensor:
    """``[new_kv, current]`` weights that merge each run of adjacent KV heads into one (``--kv-merge``).

    ``mean``: their plain mean; ``salient``: the most salient head of the run survives alone; ``weighted``:
    the mean weighted by saliency (plain mean for a run whose heads all scored 0). Runs are adjacent so
    that query head h keeps attending through KV head ``h // (heads / KV heads)`` with no reordering.
    """
    cur = kv_scores.numel()
    if new_kv < 1 or cur % new_kv:
        raise ValueError(f"cannot merge {cur} KV heads into {new_kv}: it must divide them")
    run = cur // new_kv
    s = kv_scores.detach().double().cpu().view(new_kv, run)
    if how == "mean":
        w = torch.full_like(s, 1.0 / run)
    elif how == "salient":
        w = torch.zeros_like(s).scatter_(1, s.argmax(1, keepdim=True), 1.0)
    elif how == "weighted":
        total = s.sum(1, keepdim=True)
        w = torch.where(total > 0, s / total.clamp_min(torch.finfo(s.dtype).tiny), torch.full_like(s, 1.0 / run))
    else:
        raise ValueError(f"KV merge must be one of {KV_MERGES}, got '{how}'")
    mix = torch.zeros(new_kv, cur, dtype=torch.float64)
    for g in range(new_kv):
        mix[g, g * run:(g + 1) * run] = w[g]
    return mix


def attention_keep(q_scores: torch.Tensor, kv_scores: torch.Tensor, current: LayerShape, new: LayerShape, mode: str,
                   kv_merge: str = "weighted") -> LayerKeep:
    """What one layer's attention keeps to go from shape ``current`` to ``new`` in ladder ``mode``."""
    keep = LayerKeep()
    if new.num_heads == 0:
        empty = torch.zeros(0, dtype=torch.long)
        keep.q_heads, keep.kv_heads = empty, empty
    elif mode == MERGE:
        if new.num_kv_heads < current.num_kv_heads:
            keep.kv_merge = choose_kv_merge(kv_scores, new.num_kv_heads, kv_merge)
    elif new.num_heads < current.num_heads:
        units = new.num_heads // new.num_kv_heads if mode == "query" else new.num_kv_heads
        keep.q_heads, kv = choose_attention_keep(q_scores, kv_scores, current.num_kv_heads, units, mode)
        if new.num_kv_heads < current.num_kv_heads:
            keep.kv_heads = kv
    return keep


def choose_mlp_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` most salient MLP channels, sorted."""
    return scores.topk(keep).indices.sort().values


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices covered by a sorted list of heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()
