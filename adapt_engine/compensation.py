"""Weight compensation after a cut: the consumer of removed channels absorbs what they contributed.

Removing MLP channel i deletes column i of ``down_proj``; removing a query head deletes its ``head_dim``
columns of ``o_proj``. Those columns fed the layer's output, and the columns that stay can partly take
over their contribution, because the inputs of a projection are correlated. Both consumers are linear,
so this is a least-squares problem on the calibration activations X (one row per token):

* ``lstsq``: kept columns S, removed R, Gram ``G = XᵀX``. The refit minimises
  ``‖X W_allᵀ − X_S W'_Sᵀ‖² + λ‖W'_S − W_S‖²``; its solution is the kept weights plus a correction,
  ``W'_S = W_S + W_R G[R,S] (G[S,S] + λI)⁻¹``. The ridge is on the *change* (not on the weights), so
  nothing removed means nothing changes, and for every λ ≥ 0 the output error on the calibration set is
  never above that of plain removal (``W'_S = W_S`` is a feasible point of the same objective).
  ``λ = damp · mean(diag G[S,S])`` keeps the solve well conditioned; ``--compensate-damp`` sets damp.
* ``bias`` (FLAP-style): the removed columns' mean contribution ``W_R · mean(X_R)`` is added to the
  projection's bias. Only for models whose ``o_proj`` and ``down_proj`` carry a bias; a model without
  one is refused (adding a bias would change the architecture and the parameter count).

Statistics come from the same calibration forward pass as the saliency: forward pre-hooks on every
``down_proj`` and ``o_proj`` add ``XᵀX`` of each micro-batch (a float32 GEMM accumulating in place into float32
accumulators, autocast off; under bf16 calibration the inputs are exact bf16 values, so on CPU it runs in oneDNN's
bf16 mode at float32 accuracy, :func:`gram_matmul`; the solve is in float64). Memory:
``4·(intermediate² + (heads·head_dim)²)`` bytes per layer — 323 MB for SmolLM2-135M (30 × (1536² + 576²) × 4 B),
freed after the cut, or, carried (``--compensate-carry``, the in-memory default), cut to the kept inputs and added
into by the next sub-step's pass. ``bias`` keeps only the per-input sums.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from . import precision
from .adapters import DecoderAdapter
from .args import COMPENSATIONS
from .distributed import process_group_world
from .errors import UsageError
from .groups import LayerKeep, head_rows


def check_compensation(adapter: DecoderAdapter, method: str, damp: float) -> None:
    """Raise a clear error when ``method``/``damp`` cannot work for this model."""
    if method not in COMPENSATIONS:
        raise UsageError(f"--compensate must be one of {', '.join(COMPENSATIONS)}, got '{method}'")
    if not damp >= 0.0 or damp != damp:
        raise UsageError(f"--compensate-damp must be a number >= 0 (relative ridge), got {damp}")
    if method == "bias":
        layer = adapter.layers[0]
        _, _, _, o = adapter.attention_projections(layer)
        _, _, down = adapter.mlp_projections(layer)
        missing = [name for name, lin in (("o_proj", o), ("down_proj", down)) if lin.bias is None]
        if missing:
            raise UsageError(
                f"--compensate bias adds the removed channels' mean output to a bias, but this "
                f"{adapter.family.model_type} model has no bias on {' and '.join(missing)}; adding one would change "
                f"the architecture and the parameter count. Use --compensate lstsq (refits the kept columns) or none."
            )


def statistics_bytes(adapter: DecoderAdapter, method: str) -> int:
    """Memory of every layer's statistics of ``method`` together (lstsq: float32 Gram matrices of the down_proj
    and o_proj inputs; bias: per-input sums)."""
    d = adapter.head_dim
    per_input = (lambda n: 4 * n * n) if method == "lstsq" else (lambda n: 4 * n)
    return sum(per_input(s.intermediate_size) + per_input(s.num_heads * d) for s in adapter.shapes())


@contextlib.contextmanager
def gram_matmul(x: torch.Tensor) -> Iterator[None]:
    """The numeric context of the Gram of ``x``: float32 products (autocast off), in oneDNN's bf16 mode when ``x``
    is bf16 on CPU.

    A bf16 activation (the calibration pass under bf16 autocast) is exactly representable in bf16, so that mode
    multiplies the exact values and accumulates in float32: float32-class accuracy (4.6e-7 relative to float64 on
    a 4096-token, 1536-wide Gram, against 9.6e-7 for IEEE float32) at 2.6x IEEE's speed on an AMX CPU.
    """
    exact_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
    mode = precision.fp32_matmul("bf16") if exact_bf16 else contextlib.nullcontext()  # else the pass's own mode
    # Never autocast's bf16 product: it would round every micro-batch's Gram to bf16 before the float32 sum.
    with torch.autocast(x.device.type, enabled=False), mode:
        yield


class InputStatistics:
    """Per layer, ``XᵀX`` (for ``lstsq``) or ``ΣX`` (for ``bias``) of the inputs of down_proj and o_proj."""

    def __init__(self, adapter: DecoderAdapter, method: str):
        if method not in ("bias", "lstsq"):
            raise ValueError(f"input statistics are for 'bias' or 'lstsq', got '{method}'")
        self.adapter = adapter
        self.method = method
        n = len(adapter.layers)
        self.mlp: list[torch.Tensor | None] = [None] * n
        self.attn: list[torch.Tensor | None] = [None] * n
        self.tokens = 0
        self._handles: list = []

    def _hook(self, store: list, index: int, count: bool):
        def hook(module: nn.Module, args: tuple) -> None:
            with torch.no_grad():
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1])
                # float32 accumulators: float64 ones doubled the largest buffer of a prune (issue 13) for rounding
                # of ~1e-7 relative, far below the ridge the solve adds (default: 0.1 or 0.3 × the mean diagonal).
                if self.method == "lstsq":
                    with gram_matmul(x):
                        x = x.float()
                        if store[index] is None:
                            store[index] = x.T @ x
                        else:  # accumulated inside the GEMM: no per-micro-batch product to allocate and add
                            store[index].addmm_(x.T, x)
                else:
                    stat = x.float().sum(0)
                    store[index] = stat if store[index] is None else store[index].add_(stat)
                if count:
                    self.tokens += x.shape[0]

        return hook

    def reduce_across_ranks(self) -> None:
        """Sum the statistics over torchrun ranks (each saw its own calibration shard), so all ranks refit alike."""
        if not process_group_world():
            return
        for store in (self.mlp, self.attn):
            for t in store:
                if t is not None:
                    torch.distributed.all_reduce(t)
        device = next((t.device for t in self.mlp if t is not None), torch.device("cpu"))
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tokens)
        self.tokens = tokens.item()

    def start_from(self, earlier: InputStatistics, weight: float) -> None:
        """Begin with ``weight`` × an earlier sub-step's statistics (cut to today's widths by :meth:`keep`); this
        pass then adds to them in place, so carrying costs no second copy. Each torchrun rank holds the earlier
        sum whole, so each starts from its share and the reduction over ranks adds it once."""
        share = weight / max(process_group_world(), 1)
        self.mlp = [None if t is None else t.mul_(share) for t in earlier.mlp]
        self.attn = [None if t is None else t.mul_(share) for t in earlier.attn]
        self.tokens = earlier.tokens * share

    def keep(self, plan: list[LayerKeep]) -> None:
        """Gather every layer's statistics to the inputs ``plan`` keeps, so they describe the cut model."""
        for j, keep in enumerate(plan):
            for store, index in ((self.mlp, keep.mlp), (self.attn, None if keep.q_heads is None
                                                        else head_rows(keep.q_heads, self.adapter.head_dim))):
                if index is not None and store[j] is not None:
                    index = index.to(store[j].device)
                    store[j] = store[j].index_select(0, index)
                    if store[j].dim() == 2:
                        store[j] = store[j].index_select(1, index)

    @contextlib.contextmanager
    def attached(self, layers: list[int] | None = None) -> Iterator[InputStatistics]:
        """Forward pre-hooks on every down_proj and o_proj (of ``layers`` only, if given) while inside the block;
        tokens are counted at the first of them."""
        indices = list(range(len(self.adapter.layers))) if layers is None else list(layers)
        try:
            for j in indices:
                layer = self.adapter.layers[j]
                _, _, _, o = self.adapter.attention_projections(layer)
                _, _, down = self.adapter.mlp_projections(layer)
                self._handles.append(down.register_forward_pre_hook(self._hook(self.mlp, j, j == indices[0])))
                self._handles.append(o.register_forward_pre_hook(self._hook(self.attn, j, False)))
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """Kept columns refit by ridge least squares: ``W_S + W_R G[R,S] (G[S,S] + λI)⁻¹`` (see module doc).

    Returns a new ``[out, |S|]`` tensor in ``weight``'s dtype; ``weight`` is not modified.
    """
    n = weight.shape[1]
    keep = keep.to(weight.device)
    removed_mask = torch.ones(n, dtype=torch.bool, device=weight.device)
    removed_mask[keep] = False
    removed = torch.nonzero(removed_mask).flatten()
    w_keep = weight[:, keep]
    if removed.numel() == 0 or keep.numel() == 0:
        return w_keep.clone()
    rows = gram.to(weight.device).index_select(0, keep)
    g_ss = rows.index_select(1, keep).double()
    lam = damp * float(g_ss.diagonal().mean())
    g_ss.diagonal().add_(lam)
    g_sr = rows.index_select(1, removed).double()
    w_r = weight[:, removed].double()
    # (G[S,S] + λI)⁻¹ G[S,R] W_Rᵀ: solve for whichever right-hand side is narrower (a sub-step removes a few
    # dozen channels of a layer, fewer than the projection's outputs), then multiply.
    narrow = removed.numel() < weight.shape[0]
    rhs = g_sr if narrow else g_sr @ w_r.T
    chol, info = torch.linalg.cholesky_ex(g_ss)
    if int(info) == 0:
        solved = torch.cholesky_solve(rhs, chol)
    else:  # singular G[S,S] with damp 0 (e.g. dead channels): the minimum-norm solution
        solved = torch.linalg.lstsq(g_ss, rhs, driver="gelsd" if g_ss.device.type == "cpu" else None).solution
    delta_t = solved @ w_r.T if narrow else solved
    return (w_keep.double() + delta_t.T).to(weight.dtype)


# SparseGPT's dampening of the Hessian (1 % of its mean diagonal): the greedy order needs the correlations,
# which the refit's heavier default ridge would wash out.
OBS_DAMP = 0.01


def obs_keep(weight: torch.Tensor, gram: torch.Tensor, keep_count: int, damp: float = OBS_DAMP) -> torch.Tensor:
    """The ``keep_count`` input columns of ``weight`` to keep, chosen by greedy structured OBS (sorted indices).

    One column at a time, remove the column p with the least output error ``‖W_p‖² / [H⁻¹]_pp`` after the
    optimal update of the others (H = G + λI), then apply that update to W and H⁻¹ (OBC/ZipLM's rule).
    """
    n = weight.shape[1]
    if keep_count >= n:
        return torch.arange(n)
    h = gram.to(torch.float64).clone().cpu()
    h.diagonal().add_(damp * float(h.diagonal().mean()) + 1e-12)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = weight.detach().to(torch.float64).cpu().clone()
    alive = torch.ones(n, dtype=torch.bool)
    for _ in range(n - keep_count):
        err = (w * w).sum(0) / hinv.diagonal()
        err[~alive] = float("inf")
        p = int(err.argmin())
        scale = -1.0 / float(hinv[p, p])
        row = hinv[p].clone()  # rank-1 updates in place (BLAS ger): one pass over H⁻¹ per removal
        w.addr_(w[:, p].clone(), row, alpha=scale)
        hinv.addr_(hinv[:, p].clone(), row, alpha=scale)
        alive[p] = False
    return torch.nonzero(alive).flatten()


def _compensate_linear(lin: nn.Linear, keep: torch.Tensor, stat: torch.Tensor, tokens: float, method: str,
                       damp: float) -> None:
    """Rewrite ``lin``'s kept columns (lstsq) or its bias (bias) in place, before surgery drops the rest."""
    with torch.no_grad():
        if method == "lstsq":
            lin.weight[:, keep.to(lin.weight.device)] = refit_columns(lin.weight, stat, keep, damp)
            return
        removed = torch.ones(lin.in_features, dtype=torch.bool, device=lin.weight.device)
        removed[keep.to(lin.weight.device)] = False
        mean = (stat.to(lin.weight.device, torch.float64) / max(tokens, 1))[removed]
        lin.bias.add_((lin.weight[:, removed].double() @ mean).to(lin.bias.dtype))


def compensate_plan(adapter: DecoderAdapter, plan: list[LayerKeep], stats: InputStatistics, damp: float,
                    mlp_select: str = "saliency") -> None:
    """Apply the compensation of every cut in ``plan`` to o_proj and down_proj (call before ``apply_plan``)."""
    for j, keep in enumerate(plan):
        compensate_layer(adapter, j, keep, stats, damp, mlp_select)


def compensate_layer(adapter: DecoderAdapter, j: int, keep: LayerKeep, stats: InputStatistics, damp: float,
                     mlp_select: str = "saliency") -> None:
    """The compensation of layer ``j``'s cut (its weights must be resident; call before pruning it). With
    ``mlp_select="obs"`` the kept MLP channels are first re-chosen (same count) by :func:`obs_keep`."""
    layer = adapter.layers[j]
    _, _, _, o = adapter.attention_projections(layer)
    _, _, down = adapter.mlp_projections(layer)
    if mlp_select == "obs" and keep.mlp is not None and stats.mlp[j] is not None and stats.method == "lstsq":
        keep.mlp = obs_keep(down.weight, stats.mlp[j], int(keep.mlp.numel())).to(keep.mlp.device)
    if keep.q_heads is not None and stats.attn[j] is not None:
        _compensate_linear(o, head_rows(keep.q_heads, adapter.head_dim), stats.attn[j], stats.tokens, stats.method,
                           damp)
    if keep.mlp is not None and stats.mlp[j] is not None:
        _compensate_linear(down, keep.mlp, stats.mlp[j], stats.tokens, stats.method, damp)
