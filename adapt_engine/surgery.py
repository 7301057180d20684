"""Physical removal of attention heads, MLP channels and hidden ("stem") channels, in place.

Every coupled tensor — weight, bias, a gradient if present, and the optimizer's per-parameter state of
the same shape (AdamW ``exp_avg``/``exp_avg_sq``) — is compacted with ``kernels.gather_channels``, which
moves the kept rows/columns inside the existing storage instead of allocating a copy. The same
``nn.Parameter`` objects stay in the model, so an optimizer built before pruning keeps working, with its
step counters.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import DecoderAdapter
from .groups import LayerKeep, head_rows
from .kernels import gather_channels


def _gather_param(
    param: nn.Parameter, index: torch.Tensor, dim: int, optimizer: torch.optim.Optimizer | None
) -> None:
    """Compact a parameter, its grad and its same-shaped optimizer state along ``dim`` to ``index``.

    The Parameter object itself is kept (only ``.data`` changes), so optimizers keep referring to it.
    """
    if index.numel() == param.shape[dim]:
        return  # nothing removed
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    state_keys = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape]
    tensors = [param.data]
    if param.grad is not None:
        tensors.append(param.grad)
    tensors += [state[k] for k in state_keys]
    if index.numel() == 0:  # everything goes (a removed attention sub-layer)
        new = [t.narrow(dim, 0, 0).clone() for t in tensors]
    else:
        new = gather_channels(tensors, index.to(param.device), dim)
    param.data = new[0]
    if param.grad is not None:
        param.grad = new[1]
    for key, tensor in zip(state_keys, new[len(new) - len(state_keys):]):
        state[key] = tensor


def _gather_linear(lin: nn.Linear, index: torch.Tensor, dim: int, optimizer) -> None:
    _gather_param(lin.weight, index, dim, optimizer)
    if lin.bias is not None and dim == 0:
        _gather_param(lin.bias, index, 0, optimizer)
    lin.out_features, lin.in_features = lin.weight.shape


def _mix_heads(param: nn.Parameter, mix: torch.Tensor, head_dim: int, optimizer) -> None:
    """Replace the heads (rows of ``head_dim``) of a K/V weight or bias by ``mix @ heads``, with its grad and
    same-shaped optimizer state (non-negative weights, so Adam's second moment stays non-negative)."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    state_keys = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape]

    def mixed(t: torch.Tensor) -> torch.Tensor:
        heads = t.reshape(mix.shape[1], head_dim, -1)
        out = torch.einsum("nc,cdh->ndh", mix.to(t.device, torch.float64), heads.double()).to(t.dtype)
        return out.reshape(mix.shape[0] * head_dim, *t.shape[1:]).contiguous()

    param.data = mixed(param.data)
    if param.grad is not None:
        param.grad = mixed(param.grad)
    for key in state_keys:
        state[key] = mixed(state[key])


def prune_layer(adapter: DecoderAdapter, index: int, keep: LayerKeep, optimizer=None) -> None:
    """Remove everything of layer ``index`` not listed in ``keep`` (sorted indices)."""
    layer = adapter.layers[index]
    q, k, v, o = adapter.attention_projections(layer)
    gate, up, down = adapter.mlp_projections(layer)
    d = adapter.head_dim
    if keep.q_heads is not None:
        rows = head_rows(keep.q_heads, d)
        _gather_linear(q, rows, 0, optimizer)
        _gather_linear(o, rows, 1, optimizer)
    if keep.kv_heads is not None:
        rows = head_rows(keep.kv_heads, d)
        _gather_linear(k, rows, 0, optimizer)
        _gather_linear(v, rows, 0, optimizer)
    if keep.kv_merge is not None:
        for lin in (k, v):
            _mix_heads(lin.weight, keep.kv_merge, d, optimizer)
            if lin.bias is not None:
                _mix_heads(lin.bias, keep.kv_merge, d, optimizer)
            lin.out_features = lin.weight.shape[0]
    if keep.mlp is not None:
        _gather_linear(gate, keep.mlp, 0, optimizer)
        _gather_linear(up, keep.mlp, 0, optimizer)
        _gather_linear(down, keep.mlp, 1, optimizer)
    adapter.sync_layer(index)


def apply_plan(adapter: DecoderAdapter, plan: list[LayerKeep], optimizer=None) -> None:
    """Prune every layer to its :class:`LayerKeep` and record the new widths in the config."""
    if len(plan) != len(adapter.layers):
        raise ValueError(f"plan has {len(plan)} layers, model has {len(adapter.layers)}")
    for i, keep in enumerate(plan):
        prune_layer(adapter, i, keep, optimizer)
    adapter.record_shapes()


def prune_stem(adapter: DecoderAdapter, keep: torch.Tensor, optimizer=None) -> None:
    """Keep only hidden channels ``keep`` (sorted) in every tensor they span (``DecoderAdapter.stem_members``).

    Every norm then normalises over the kept channels alone: removal is not zeroing, as an RMSNorm's mean square
    is taken over the hidden size (tests compare with a reference whose norms are computed over the kept channels).
    The config's hidden_size follows, with head_dim written explicitly.
    """
    old = adapter.hidden_size
    if keep.numel() == old:
        return
    multiple = adapter.hidden_multiple([adapter.config.num_attention_heads])
    if keep.numel() == 0 or keep.numel() % multiple:
        raise ValueError(f"cannot keep {keep.numel()} hidden channels: a {adapter.family.model_type} config needs a "
                         f"positive multiple of {multiple} (its num_attention_heads)")
    for param, dim in adapter.stem_members():
        _gather_param(param, keep, dim, optimizer)
    adapter.sync_hidden()
    adapter.keep_embedding_scale(old, optimizer)
    adapter.record_hidden()


def zero_mask_layer(adapter: DecoderAdapter, index: int, keep: LayerKeep) -> None:
    """Zero (instead of remove) what ``keep`` drops: the reference that surgery must match exactly.

    A KV merge is mirrored by giving every KV head of a merged run the merged K/V (shapes unchanged).
    """
    layer = adapter.layers[index]
    q, k, v, o = adapter.attention_projections(layer)
    gate, up, down = adapter.mlp_projections(layer)
    d = adapter.head_dim

    def dropped(n: int, kept: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(n, dtype=torch.bool)
        mask[kept.cpu()] = False
        return mask

    with torch.no_grad():
        if keep.q_heads is not None:
            cols = dropped(o.in_features, head_rows(keep.q_heads, d))
            o.weight[:, cols] = 0  # a head whose output columns are zero contributes nothing
        if keep.kv_heads is not None:
            n_rep = q.out_features // k.out_features
            gone = dropped(k.out_features // d, keep.kv_heads)
            heads = torch.nonzero(gone).flatten()
            q_heads = (heads[:, None] * n_rep + torch.arange(n_rep)).flatten()
            cols = torch.zeros(o.in_features, dtype=torch.bool)
            cols[head_rows(q_heads, d)] = True
            o.weight[:, cols] = 0
        if keep.q_heads is not None and keep.q_heads.numel() == 0 and o.bias is not None:
            o.bias.zero_()  # no attention at all adds no o_proj bias either
        if keep.kv_merge is not None:
            run = keep.kv_merge.shape[1] // keep.kv_merge.shape[0]
            spread = keep.kv_merge.repeat_interleave(run, dim=0)  # each head takes its run's merged rows
            for lin in (k, v):
                for t in (lin.weight, lin.bias):
                    if t is not None:
                        heads = t.reshape(spread.shape[1], d, -1).double()
                        t.copy_(torch.einsum("nc,cdh->ndh", spread, heads).reshape(t.shape).to(t.dtype))
        if keep.mlp is not None:
            ch = dropped(gate.out_features, keep.mlp)
            gate.weight[ch] = 0
            up.weight[ch] = 0
            if up.bias is not None:
                up.bias[ch] = 0
            down.weight[:, ch] = 0
