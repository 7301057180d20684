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

Per-head q_norm/k_norm (Qwen3) act on ``head_dim`` and are shared across heads: never sliced.
Hidden size, embeddings and norms are not pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import DecoderAdapter
from .args import ATTENTION_MODES

# Score buckets per layer.
Q_HEADS, KV_HEADS, MLP = "q_heads", "kv_heads", "mlp"


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
        for lin, bucket, dim, gs in (
            (q, Q_HEADS, 0, d), (k, KV_HEADS, 0, d), (v, KV_HEADS, 0, d), (o, Q_HEADS, 1, d),
            (gate, MLP, 0, 1), (up, MLP, 0, 1), (down, MLP, 1, 1),
        ):
            members[lin.weight] = Member(i, bucket, dim, gs)
            # A bias belongs to the group only when it is indexed by the pruned dimension (q/k/v/gate/up).
            if lin.bias is not None and dim == 0:
                members[lin.bias] = Member(i, bucket, 0, gs)
    return members


@dataclass
class GroupScores:
    """Saliency per group: for each layer, per query head, per KV head (K/V alone), per MLP channel."""

    q_heads: list[torch.Tensor] = field(default_factory=list)
    kv_heads: list[torch.Tensor] = field(default_factory=list)
    mlp: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def zeros(cls, adapter: DecoderAdapter, device: torch.device | str = "cpu") -> GroupScores:
        """Zero scores shaped like the model's current layers."""
        out = cls()
        for s in adapter.shapes():
            out.q_heads.append(torch.zeros(s.num_heads, dtype=torch.float32, device=device))
            out.kv_heads.append(torch.zeros(s.num_kv_heads, dtype=torch.float32, device=device))
            out.mlp.append(torch.zeros(s.intermediate_size, dtype=torch.float32, device=device))
        return out

    def bucket(self, layer: int, name: str) -> torch.Tensor:
        """The score vector of one bucket of one layer."""
        return getattr(self, name)[layer]

    def all_tensors(self) -> list[torch.Tensor]:
        """Every score vector (for cross-rank reduction)."""
        return [*self.q_heads, *self.kv_heads, *self.mlp]


@dataclass
class LayerKeep:
    """Sorted indices to keep in one layer; ``None`` means the part is left as it is."""

    q_heads: torch.Tensor | None = None
    kv_heads: torch.Tensor | None = None
    mlp: torch.Tensor | None = None


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


def choose_mlp_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` most salient MLP channels, sorted."""
    return scores.topk(keep).indices.sort().values


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices covered by a sorted list of heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()
