"""The knowledge-distillation loss of ``accel --distill`` (NutePrune, seeds/003 Eq. 5-7):

    L = T² · KL(p_teacher/T ‖ p_student/T) + α · Σ_l MSE(h_l^student, h_l^teacher) + ce_weight · CE

The KL term never holds a batch's logits. Like the fused cross-entropy (``kernels/linear_ce.py``), it walks
the tokens in chunks: per chunk the student's and the teacher's logits are made from their last hidden
states and LM heads, turned into the chunk's KL and, in the same pass, into the gradient with respect to
the student's logits, ``T · (softmax(z_s/T) − softmax(z_t/T))``; two matrix products turn that into the
chunk's gradients for the student's hidden states and LM head. Peak extra memory is four chunk × vocab
float32 buffers (``CHUNK_ELEMS`` elements each: 32 MB) and, for 16-bit logits, two 16-bit ones (16 MB), so
about 160 MB whatever the batch, all allocated once per call and reused by every chunk; the hidden-state
gradient (shaped like the hidden states); and, when the head trains, one float32 buffer shaped like the head
(SmolLM2: 49,152 × 576, 113 MB) plus, for a 16-bit head, a 16-bit one for each chunk's share (57 MB) —
instead of batch × seq × vocab logits for each model. :func:`linear_kl_reference` is the plain float64 truth.
With ``--ce-weight`` the next-token cross-entropy is made in the same pass from the same chunks of the
student's logits (:func:`linear_kl_ce`), its gradient added to the KL's before the two head products.

The teacher runs under ``torch.no_grad`` and is never an input of the autograd graph, so gradients flow only
into the student. With teacher == student (same weights, same dtype) both logit chunks are bitwise equal,
so every log-ratio, the KL and its gradient are exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapters import decoder_body, fused_lm_head
from .errors import UsageError
from .kernels.linear_ce import acc_dtype, chunk_rows


def _logits_into(h: torch.Tensor, w: torch.Tensor, low: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out`` (accumulation dtype) = h @ wᵀ, through the reused low-precision buffer ``low`` when h is 16-bit."""
    if low is None:
        torch.mm(h, w.t(), out=out)
    else:
        out.copy_(torch.mm(h, w.t(), out=low))


def _chunk_pass(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor, temperature: float,
                want_grad_h: bool, want_grad_w: bool, rows: int, targets: torch.Tensor | None = None,
                ce_weight: float = 0.0):
    """One walk over the tokens: (summed KL, summed CE, grad wrt hs or None, float32 grad wrt ws or None).

    Sums are unscaled by 1/N and the KL by T². With ``targets`` the next-token cross-entropy of the student's
    logits (at temperature 1) is summed too and ``ce_weight`` times its gradient is added to the KL's, so the
    student's logits are made once for both terms.

    Every chunk-sized buffer is allocated once and reused (a fresh 32 MB tensor per operation cost more than
    the operation: its pages are faulted in anew each time), and each elementwise step is one pass:
    log-softmaxes into their own buffers, p = exp(log p), log p − log q in place, the per-token KL as a
    row-wise dot product with p, and the gradient q − p in place of q's buffer.
    """
    n, vocab = hs.shape[0], ws.shape[0]
    acc = acc_dtype(hs.dtype)
    m = min(rows, n)
    total = torch.zeros((), dtype=torch.float64, device=hs.device)
    ce_total = torch.zeros((), dtype=torch.float64, device=hs.device)
    want_ce = targets is not None
    # the log-softmax at temperature 1 for the cross-entropy, when the KL's is at another temperature
    log_q1 = torch.empty((m, vocab), dtype=acc, device=hs.device) if want_ce and temperature != 1.0 else None
    grad_h = torch.empty_like(hs) if want_grad_h else None
    grad_w = (torch.empty if n else torch.zeros)(ws.shape, dtype=acc, device=ws.device) if want_grad_w else None
    xs, log_q, xt, log_p = (torch.empty((m, vocab), dtype=acc, device=hs.device) for _ in range(4))
    low_s = torch.empty((m, vocab), dtype=hs.dtype, device=hs.device) if hs.dtype != acc else None
    low_t = torch.empty((m, vocab), dtype=ht.dtype, device=ht.device) if ht.dtype != acc else None
    part_w = torch.empty_like(ws) if grad_w is not None and ws.dtype != acc else None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        k = r1 - r0
        a_s, l_s, a_t, l_t = xs[:k], log_q[:k], xt[:k], log_p[:k]
        _logits_into(hs[r0:r1], ws, None if low_s is None else low_s[:k], a_s)
        _logits_into(ht[r0:r1], wt, None if low_t is None else low_t[:k], a_t)
        if log_q1 is not None:
            torch.log_softmax(a_s, 1, out=log_q1[:k])
        if temperature != 1.0:
            a_s.div_(temperature)
            a_t.div_(temperature)
        torch.log_softmax(a_s, 1, out=l_s)
        torch.log_softmax(a_t, 1, out=l_t)
        p = torch.exp(l_t, out=a_t)
        l_t.sub_(l_s)  # log p − log q: exactly 0 everywhere when the two logit chunks are equal
        total += torch.linalg.vecdot(p, l_t).sum(dtype=torch.float64)
        if want_ce:
            tgt = targets[r0:r1].unsqueeze(1)
            l_1 = l_s if log_q1 is None else log_q1[:k]
            ce_total -= l_1.gather(1, tgt).sum(dtype=torch.float64)
        if grad_h is None and grad_w is None:
            continue
        # d(T²·KL)/dz_s = T·(q − p), plus ce_weight·(softmax(z_s) − onehot(target)) with the cross-entropy
        q = torch.exp(l_s, out=a_s)
        if want_ce and log_q1 is None:
            g = q.mul_(1.0 + ce_weight).sub_(p)  # temperature 1: q·(1 + w) − p
        else:
            g = q.sub_(p)
            if temperature != 1.0:
                g.mul_(temperature)
            if want_ce:
                g.add_(log_q1[:k].exp_(), alpha=ce_weight)
        if want_ce:
            g.scatter_add_(1, tgt, torch.full(tgt.shape, -ce_weight, dtype=g.dtype, device=g.device))
        if low_s is not None:
            g = low_s[:k].copy_(g)
        hc = hs[r0:r1]
        if grad_h is not None:
            torch.mm(g, ws, out=grad_h[r0:r1])
        if grad_w is not None:
            if part_w is None:  # float32/64: accumulate straight into the result
                if r0 == 0:
                    torch.mm(g.t(), hc, out=grad_w)
                else:
                    grad_w.addmm_(g.t(), hc)
            else:  # 16-bit: each chunk's product lands in one reused buffer, then adds into float32
                torch.mm(g.t(), hc, out=part_w)
                if r0 == 0:
                    grad_w.copy_(part_w)
                else:
                    grad_w += part_w
    return total, ce_total, grad_h, grad_w


class LinearKLFunction(torch.autograd.Function):
    """(loss, kl, ce): kl = mean over tokens of T²·KL(softmax(ht·wtᵀ/T) ‖ softmax(hs·wsᵀ/T)), ce = mean next-token
    cross-entropy of hs·wsᵀ when targets are given (else 0), loss = kl + ce_weight·ce; gradients of loss
    computed in the forward pass (kl and ce are values only)."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, temperature, rows, targets, ce_weight):  # noqa: D102
        n = max(1, hs.shape[0])
        total, ce_total, grad_h, grad_w = _chunk_pass(hs, ws, ht, wt, temperature, ctx.needs_input_grad[0],
                                                      ctx.needs_input_grad[1], rows, targets, ce_weight)
        ctx.ws_dtype = ws.dtype
        ctx.save_for_backward(grad_h, grad_w)
        ctx.scale = 1.0 / n
        out = acc_dtype(hs.dtype)  # float32 (float64 for float64)
        kl, ce = total * (temperature ** 2) / n, ce_total / n
        loss, kl, ce = (kl + ce_weight * ce).to(out), kl.to(out), ce.to(out)
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_out, _grad_kl, _grad_ce):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out.double() * ctx.scale
        if grad_h is not None:
            grad_h = grad_h * scale.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * scale.to(grad_w.dtype)).to(ctx.ws_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def linear_kl(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
              teacher_head: torch.Tensor, temperature: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """T²-scaled KL(teacher ‖ student) of the softmaxes at temperature T, averaged over tokens, in token chunks.

    ``*_hidden`` are (..., H) last hidden states of the same tokens, ``*_head`` the (V, H) LM heads. Under
    autocast the student's inputs are cast to the autocast dtype, as ``nn.Linear`` would; the softmaxes are
    float32. The teacher's tensors are detached: no gradient reaches them.
    """
    return linear_kl_ce(student_hidden, student_head, teacher_hidden, teacher_head, None, temperature, 0.0, chunk)[0]


def linear_kl_ce(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
                 teacher_head: torch.Tensor, targets: torch.Tensor | None, temperature: float = 1.0,
                 ce_weight: float = 0.0, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl + ce_weight·ce, kl, ce) in one chunked pass: :func:`linear_kl` and, with ``targets`` (the next token
    of every position, shaped like the hidden states without their last dim), the mean cross-entropy of the
    student's logits at temperature 1 (0 without targets). Only the first output is differentiable."""
    if student_head.shape[0] != teacher_head.shape[0]:
        raise UsageError(f"--distill: the student's vocabulary ({student_head.shape[0]}) and the teacher's "
                         f"({teacher_head.shape[0]}) differ; distil only between versions of one model")
    device_type = student_hidden.device.type
    hs, ws = student_hidden, student_head
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hs, ws = hs.to(dtype), ws.to(dtype)
    if hs.dtype != ws.dtype or teacher_hidden.dtype != teacher_head.dtype:
        raise TypeError(f"linear_kl: each model's hidden states and head need one dtype (student {hs.dtype} and "
                        f"{ws.dtype}, teacher {teacher_hidden.dtype} and {teacher_head.dtype}); call under "
                        f"torch.autocast or cast one")
    if targets is not None:
        if targets.shape != student_hidden.shape[:-1] or targets.dtype.is_floating_point:
            raise ValueError(f"linear_kl_ce: targets must be integer token ids shaped "
                             f"{tuple(student_hidden.shape[:-1])}, got {targets.dtype} {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= ws.shape[0]):
            raise ValueError(f"linear_kl_ce: targets must lie in [0, {ws.shape[0]}) (no ignored positions)")
        targets = targets.reshape(-1).to(torch.int64)
    hs = hs.reshape(-1, hs.shape[-1]).contiguous()
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).contiguous()
    rows = chunk_rows(chunk, ws.shape[0])  # the fused cross-entropy's rule: about CHUNK_ELEMS logits per chunk
    with torch.autocast(device_type, enabled=False):
        return LinearKLFunction.apply(hs, ws.contiguous(), ht, teacher_head.detach().contiguous(),
                                      float(temperature), rows, targets, float(ce_weight))


def linear_kl_reference(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
                        teacher_head: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Ground truth of :func:`linear_kl`: the full logits, log-softmaxes and KL in float64 (differentiable)."""
    zs = student_hidden.reshape(-1, student_hidden.shape[-1]).double() @ student_head.double().t()
    zt = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).double() @ teacher_head.detach().double().t()
    log_q, log_p = F.log_softmax(zs / temperature, -1), F.log_softmax(zt / temperature, -1)
    return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def layer_mse(student_states, teacher_states) -> torch.Tensor:
    """Σ over decoder layers of the mean squared difference of their outputs (float32)."""
    if len(student_states) != len(teacher_states):
        raise UsageError(f"--kd-layer-weight: the student has {len(student_states) - 1} decoder layers and the "
                         f"teacher {len(teacher_states) - 1}; the layer term needs them to match (use "
                         f"--kd-layer-weight 0)")
    total = student_states[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_states[1:], teacher_states[1:]):  # [0] is the embedding output, not a layer's
        if s.shape != t.shape:
            raise UsageError(f"--kd-layer-weight: student hidden states {tuple(s.shape)} and teacher hidden states "
                             f"{tuple(t.shape)} differ in size (a mode that prunes the hidden size); the layer term "
                             f"needs equal sizes: use --kd-layer-weight 0")
        total = total + F.mse_loss(s.float(), t.detach().float())
    return total


@dataclass
class DistillLoss:
    """The loss of one micro-batch against a frozen ``teacher``: ``(loss, {"kl", "layer", "ce"})``."""

    teacher: torch.nn.Module
    temperature: float = 1.0
    layer_weight: float = 0.0
    ce_weight: float = 0.0

    def __call__(self, forward_model: torch.nn.Module, model: torch.nn.Module,
                 input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student forward through ``forward_model`` (e.g. DDP around ``model``), teacher forward without grad."""
        head, t_head = fused_lm_head(model), fused_lm_head(self.teacher)
        if head is None or t_head is None:
            raise UsageError("--distill needs a model whose logits are its LM head applied to the last hidden "
                             "state (not Gemma 2/3's soft-capped or Granite's scaled logits); use --distill none")
        want_layers = self.layer_weight > 0
        with torch.no_grad():
            # The decoder body only: the KL makes the teacher's logits itself. (Through the LM model, a bf16
            # teacher's head on its one kept position ran as a batched matmul that first copied the whole head
            # once per sequence: a third of a distillation step on SmolLM2's 49k x 576 head.)
            t_out = decoder_body(self.teacher)(input_ids=input_ids, use_cache=False,
                                               output_hidden_states=want_layers)
        out = forward_model(input_ids=input_ids, use_cache=False, logits_to_keep=1, output_hidden_states=True)
        hs = out.hidden_states
        ht = t_out.hidden_states if want_layers else (t_out.last_hidden_state,)
        if hs[-1].shape[-1] != ht[-1].shape[-1]:
            raise UsageError(f"--distill: the student's hidden size {hs[-1].shape[-1]} differs from the teacher's "
                             f"{ht[-1].shape[-1]}; the logit and layer terms need equal hidden sizes")
        # Positions with a next token, as the cross-entropy counts them (the step weights assume L − 1 per row);
        # with --ce-weight the cross-entropy is made from the same chunks of the student's logits as the KL.
        want_ce = self.ce_weight > 0
        loss, kl, ce = linear_kl_ce(hs[-1][:, :-1], head.weight, ht[-1][:, :-1], t_head.weight,
                                    input_ids[:, 1:] if want_ce else None, self.temperature, self.ce_weight)
        terms = {"kl": kl}
        if want_layers:
            layer = layer_mse(hs, ht)
            loss = loss + self.layer_weight * layer
            terms["layer"] = layer.detach()
        if want_ce:
            terms["ce"] = ce
        return loss, terms
