"""Fused linear + cross-entropy: ``F.cross_entropy(hidden @ weight.T, targets)`` without the full logits.

A causal LM's loss multiplies every token's last hidden state by the LM head (vocab × hidden) and
takes a softmax over the vocabulary. Done plainly, tokens × vocab logits exist at once, and so do
their log-softmax and gradient (SmolLM2: 32 × 64 tokens × 49,152 = 400 MB each in fp32), several
times the activations of the whole model. Here the tokens are walked in chunks: per chunk, the
logits are computed into one reused buffer, a row kernel turns them into each token's loss and,
in the same buffer, into the gradient of the loss with respect to the logits, and two matrix
products turn that into the chunk's gradient with respect to the hidden states and its share of
the gradient with respect to the weight. Peak extra memory is one chunk of logits (about
``CHUNK_ELEMS`` elements; for 16-bit inputs also its float32 scratch), the hidden-state gradient
(shaped like ``hidden``) and, only when the weight needs a gradient, one float32 buffer shaped like
the weight.

For ``reduction`` "mean" and "sum" the loss is a scalar, so the gradients are computed in the
forward pass (one pass over the logits, not two) and scaled by the incoming gradient in
backward. For "none" the forward computes the losses only and backward recomputes the logits.

Numerics: logits are produced by a matmul in the inputs' dtype (fp32 accumulation inside); the
softmax, the log-sum-exp and the loss are computed in float32 (float64 for float64 inputs), as
transformers' loss does after upcasting the logits. So bf16/fp16 results carry the same logit
rounding as ``F.cross_entropy(F.linear(h, W).float(), t)`` in that dtype. The loss is returned in
float32 (float64 for float64 inputs). Under ``torch.autocast`` both inputs are cast to the
autocast dtype first, like ``nn.Linear`` would be, and gradients flow back through the cast.

The row kernel is the only backend-specific part: plain torch here (CPU and fallback), Triton
for CUDA in ``linear_ce_triton.py``; the public entry point in ``dispatch.py`` picks it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")
# Logits per chunk: 8 Mi elements (32 MB in fp32; 170 tokens of a 49 k vocabulary). The weight
# gradient is a sum over chunks of (vocab × chunk) @ (chunk × hidden) products whose cost is
# writing the vocab × hidden result, so fewer, larger chunks make it cheaper (measured on SmolLM2's
# head: 85-token chunks spent as long on it as on the forward matmul).
CHUNK_ELEMS = 1 << 23
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# ce_rows(logits, targets, scale, ignore_index) -> per-row loss (float32/64; 0 for ignored rows).
# When scale (a per-row float tensor) is given, it also overwrites logits in place with
# scale · (softmax(logits) − onehot(target)), and with zeros on ignored rows.
CeRows = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", int], torch.Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype chunks of logits are reduced in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def ce_rows_torch(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None,
                  ignore_index: int, work: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch row kernel: per-row cross-entropy, and in place the scaled logit gradient if scale is given.

    Every step works in place on one float32/float64 buffer: the logits themselves, or for 16-bit logits
    ``work`` (at least as many rows; allocated when not given). Fresh temporaries of a 33 MB chunk cost more than
    the arithmetic (a profiled calibration pass spent 3.4 s of 24 in this kernel's copies and log-sum-exp; in place, a
    170 × 49,152 bf16 chunk takes 14 ms against 43 ms).
    """
    acc = acc_dtype(logits.dtype)
    if logits.dtype == acc:
        x = logits
    else:
        x = (torch.empty(logits.shape, dtype=acc, device=logits.device) if work is None
             else work[: logits.shape[0]]).copy_(logits)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).unsqueeze(1)
    picked = x.gather(1, safe).squeeze(1)
    peak = x.amax(1, keepdim=True)
    total = x.sub_(peak).exp_().sum(1, keepdim=True)  # x is now exp(logit - max); gathered before that
    loss = torch.where(valid, (peak + total.log()).squeeze(1) - picked, 0.0)
    if scale is not None:
        row_scale = torch.where(valid, scale.to(acc), 0.0).unsqueeze(1)
        x.mul_(row_scale / total)  # softmax × scale
        x.scatter_add_(1, safe, -row_scale)
        if x.data_ptr() != logits.data_ptr():
            logits.copy_(x)
    return loss


def chunk_rows(chunk: int | None, vocab: int) -> int:
    """Tokens per chunk: the caller's value, or enough tokens for about CHUNK_ELEMS logits."""
    if chunk is None:
        return max(1, CHUNK_ELEMS // max(1, vocab))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be a positive number of tokens, got {chunk!r}")
    return chunk


def fused_pass(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, ignore_index: int, scale: torch.Tensor | None,
               rows: int, want_grad_h: bool, want_grad_w: bool, ce_rows: CeRows):
    """One chunked walk over the tokens: (per-token loss, grad wrt h or None, fp32 grad wrt w or None).

    Gradients are only produced when ``scale`` (per-token factor of d loss / d logits) is given.
    """
    n, vocab = h.shape[0], w.shape[0]
    acc = acc_dtype(h.dtype)
    loss = torch.empty(n, dtype=acc, device=h.device)
    grad_h = torch.empty_like(h) if scale is not None and want_grad_h else None
    grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if scale is not None and want_grad_w else None
    buf = torch.empty((min(rows, n), vocab), dtype=h.dtype, device=h.device)
    if ce_rows is ce_rows_torch and h.dtype != acc:  # its float32 scratch for 16-bit chunks, allocated once
        ce_rows = functools.partial(ce_rows_torch, work=torch.empty(buf.shape, dtype=acc, device=h.device))
    # 16-bit weight gradient: each chunk's product lands in one reused buffer, then adds into fp32.
    part_w = torch.empty_like(w) if grad_w is not None and h.dtype != acc else None
    wt = w.t()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        hc, logits = h[r0:r1], buf[: r1 - r0]
        torch.mm(hc, wt, out=logits)
        loss[r0:r1] = ce_rows(logits, t[r0:r1], None if scale is None else scale[r0:r1], ignore_index)
        if grad_h is not None:
            torch.mm(logits, w, out=grad_h[r0:r1])
        if grad_w is not None:
            if h.dtype == acc:
                grad_w.addmm_(logits.t(), hc)
            else:
                grad_w += torch.mm(logits.t(), hc, out=part_w)
    return loss, grad_h, grad_w


def check_args(hidden, weight, targets, ignore_index, reduction, same_dtype: bool = True) -> None:
    """Clear errors for shapes, dtypes, devices and target values that cannot work (``same_dtype=False``: under
    autocast, which casts both to its dtype, hidden and weight may differ)."""
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a torch.Tensor, got {type(x).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy: weight must be 2-D (vocab, hidden), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} must end in the weight's hidden size "
            f"{weight.shape[1]} (weight is {tuple(weight.shape)}: vocab × hidden, as nn.Linear stores it)"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: targets {tuple(targets.shape)} must have hidden's shape without its last "
            f"dim, {tuple(hidden.shape[:-1])}"
        )
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must be float32, "
            "bfloat16, float16 or float64"
        )
    if same_dtype and hidden.dtype != weight.dtype:
        raise TypeError(
            f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to the "
            "other's dtype, or call under torch.autocast"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: targets must be integer class indices, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"linear_cross_entropy: hidden ({hidden.device}), weight ({weight.device}) and targets "
            f"({targets.device}) must be on one device"
        )
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):
        first = int(targets[bad].view(-1)[0])
        raise ValueError(
            f"linear_cross_entropy: target {first} is outside the vocabulary [0, {weight.shape[0]}) and is not "
            f"ignore_index={ignore_index}"
        )


def _row_scale(t: torch.Tensor, ignore_index: int, reduction: str, acc: torch.dtype):
    """(per-token d loss / d token loss, number of counted tokens) for mean or sum."""
    valid = (t != ignore_index).to(acc)
    count = valid.sum()
    if reduction == "mean":
        return valid / count.clamp(min=1), count
    return valid, count


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of fused_pass; inputs are already flattened to (N, H), (V, H) and (N,)."""

    @staticmethod
    def forward(ctx, h, w, t, ignore_index, reduction, rows, ce_rows):  # noqa: D102
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.meta = (ignore_index, reduction, rows, ce_rows, need_h, need_w, w.dtype)
        acc = acc_dtype(h.dtype)
        if reduction == "none":
            loss, _, _ = fused_pass(h, w, t, ignore_index, None, rows, False, False, ce_rows)
            ctx.save_for_backward(h, w, t)
            return loss
        scale, count = _row_scale(t, ignore_index, reduction, acc)
        loss, grad_h, grad_w = fused_pass(h, w, t, ignore_index, scale, rows, need_h, need_w, ce_rows)
        total = loss.sum()
        if reduction == "mean":
            total = total / count  # 0/0 = nan when every token is ignored, as F.cross_entropy
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        ignore_index, reduction, rows, ce_rows, need_h, need_w, w_dtype = ctx.meta
        if reduction == "none":
            h, w, t = ctx.saved_tensors
            scale = grad_out.to(acc_dtype(h.dtype)) * (t != ignore_index)
            _, grad_h, grad_w = fused_pass(h, w, t, ignore_index, scale, rows, need_h, need_w, ce_rows)
        else:
            grad_h, grad_w = ctx.saved_tensors
            if grad_h is not None:
                grad_h = grad_h * grad_out.to(grad_h.dtype)
            if grad_w is not None:
                grad_w = grad_w * grad_out.to(grad_w.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(w_dtype)
        return grad_h, grad_w, None, None, None, None, None


def run_linear_cross_entropy(hidden, weight, targets, ignore_index: int, reduction: str, chunk: int | None,
                             ce_rows: CeRows) -> torch.Tensor:
    """Shared driver of every backend: checks, autocast, flattening, and the autograd function."""
    autocast = isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type)
    check_args(hidden, weight, targets, ignore_index, reduction, same_dtype=not autocast)
    device_type = hidden.device.type
    if autocast:
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    rows = chunk_rows(chunk, weight.shape[0])
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            loss = LinearCrossEntropyFunction.apply(h.contiguous(), weight.contiguous(), t, ignore_index,
                                                    reduction, rows, ce_rows)
        else:
            with torch.no_grad():
                per_token, _, _ = fused_pass(h.contiguous(), weight.contiguous(), t, ignore_index, None, rows,
                                             False, False, ce_rows)
            if reduction == "none":
                loss = per_token
            else:
                loss = per_token.sum()
                if reduction == "mean":
                    loss = loss / (t != ignore_index).sum()
    return loss.view(lead) if reduction == "none" else loss


def linear_cross_entropy_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "mean",
                               chunk: int | None = None) -> torch.Tensor:
    """The chunked fused loss with the plain-torch row kernel (the CPU path and the fallback)."""
    return run_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, chunk, ce_rows_torch)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Ground truth: F.cross_entropy(F.linear(hidden, weight), targets) with everything in float64."""
    check_args(hidden, weight, targets, ignore_index, reduction)
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]).double(), weight.double())
    loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss.view(hidden.shape[:-1]) if reduction == "none" else loss


@torch.no_grad()
def linear_cross_entropy_vocab_chunks(hidden: torch.Tensor, weight_chunks: Iterable[torch.Tensor],
                                      targets: torch.Tensor, scale: torch.Tensor | None = None, *,
                                      ignore_index: int = -100, chunk: int | None = None,
                                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``F.cross_entropy(hidden @ W.T, targets, reduction="none")`` with the head ``W`` given as its
    consecutive row blocks (vocabulary chunks), each used once and then dropped, so ``W`` is never whole.

    ``hidden`` is (N, H), ``targets`` (N,). With ``scale`` (N,: d total / d token loss) it also returns the
    gradient of the total with respect to ``hidden``; the head is frozen (no weight gradient). One pass over
    the vocabulary: the log-sum-exp and the softmax-weighted sum of head rows are accumulated online, rescaled
    whenever a row's running maximum grows. Logits are computed in the inputs' dtype and reduced in float32
    (float64 for float64), as :func:`fused_pass`; under ``torch.autocast`` both inputs are cast first, like
    ``nn.Linear``. Summation order over the vocabulary differs from the whole-head kernel, so results agree
    with it to rounding (float32: about 1e-6 relative), not bit for bit.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy_vocab_chunks: hidden must be (N, H) and targets (N,), got "
                         f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
    out_dtype = hidden.dtype
    cast = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
    h = hidden.to(cast) if cast is not None else hidden
    n, acc = h.shape[0], acc_dtype(h.dtype)
    valid = targets != ignore_index
    run_max = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
    run_sum = torch.zeros(n, dtype=acc, device=h.device)
    target_logit = torch.zeros(n, dtype=acc, device=h.device)
    want_grad = scale is not None
    weighted = torch.zeros(h.shape, dtype=acc, device=h.device) if want_grad else None  # Σ exp(l − max)·W_v
    target_row = torch.zeros(h.shape, dtype=acc, device=h.device) if want_grad else None  # W[target]
    v0 = 0
    chunks = iter(weight_chunks)
    try:
        for w in chunks:
            w = w.to(cast) if cast is not None else w
            if w.dim() != 2 or w.shape[1] != h.shape[1] or w.dtype != h.dtype:
                raise ValueError(f"linear_cross_entropy_vocab_chunks: a head chunk is {tuple(w.shape)} {w.dtype}; "
                                 f"it must be (rows, {h.shape[1]}) {h.dtype}")
            v1 = v0 + w.shape[0]
            here = valid & (targets >= v0) & (targets < v1)
            local = torch.where(here, targets - v0, 0)
            rows = chunk_rows(chunk, w.shape[0])
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                logits = torch.mm(h[r0:r1], w.t()).to(acc)
                sel = here[r0:r1]
                target_logit[r0:r1] += torch.where(sel, logits.gather(1, local[r0:r1, None]).squeeze(1), 0.0)
                new_max = torch.maximum(run_max[r0:r1], logits.max(dim=1).values)
                decay = torch.exp(run_max[r0:r1] - new_max)  # 0 on the first chunk (max was −inf)
                probs = logits.sub_(new_max[:, None]).exp_()
                run_sum[r0:r1] = run_sum[r0:r1] * decay + probs.sum(dim=1)
                run_max[r0:r1] = new_max
                if want_grad:
                    weighted[r0:r1].mul_(decay[:, None]).add_(torch.mm(probs.to(w.dtype), w).to(acc))
            if want_grad and bool(here.any()):
                target_row[here] = w[local[here]].to(acc)
            v0 = v1
    finally:
        close = getattr(chunks, "close", None)  # a generator reading the chunks releases its reader now
        if close is not None:
            close()
    bad = valid & ((targets < 0) | (targets >= v0))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy_vocab_chunks: target {int(targets[bad][0])} is outside the "
                         f"vocabulary [0, {v0}) and is not ignore_index={ignore_index}")
    loss = torch.where(valid, run_max + torch.log(run_sum) - target_logit, 0.0)
    grad = None
    if want_grad:
        factor = torch.where(valid, scale.to(acc), 0.0)[:, None]
        grad = ((weighted / run_sum[:, None] - target_row) * factor).to(out_dtype)
    return loss, grad
