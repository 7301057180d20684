"""Multi-tensor AdamW step: argument checks, the plain-torch reference, and the chunk geometry.

The Triton kernel is in ``adamw_triton.py``; ``dispatch.adamw_step`` picks the backend by device.

Math (decoupled weight decay, as ``torch.optim.AdamW``), per element, computed in float32::

    p ← p·(1 − lr·wd)
    m ← m + (1 − β1)·(g − m)
    v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

Why multi-tensor: a decoder LLM has hundreds of parameter tensors (SmolLM2: 272), many tiny (norms).
One launch per tensor costs tens of µs of Python/launch overhead each, more than the update itself, so
the kernel walks a table of ``(tensor, chunk)`` pairs and reads each tensor's addresses from a second
table. Nothing is cached per parameter *shape*: the chunk table is rebuilt whenever numels change, so
a parameter shrunk in place by pruning (with its moments sliced alike) just works on the next step.
"""

from __future__ import annotations

import math

import torch

# Elements per program: BLOCK lanes × ITERS iterations (a 16 Ki-element chunk keeps launches few
# for big matrices while a 576-element norm still gets exactly one program).
BLOCK = 1024
ITERS = 16


def adamw_step_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Plain-torch AdamW update in place (float32 math, results cast back to each tensor's dtype)."""
    check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, step)
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p32, g32, m32, v32 = p.float(), g.float(), m.float(), v.float()
        p32 = p32 * (1.0 - lr * weight_decay)
        m32 = m32 + (1.0 - beta1) * (g32 - m32)
        v32 = v32 * beta2 + (1.0 - beta2) * g32 * g32
        denom = v32.sqrt() / bc2_sqrt + eps
        p32 = p32 - (lr / bc1) * (m32 / denom)
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)


def check_adamw_args(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
) -> None:
    """Clear errors for list lengths, the step counter, and shapes that differ (state not sliced with a weight)."""
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError(
            f"adamw step needs one grad and two moments per param, got {len(params)} params, "
            f"{len(grads)} grads, {len(exp_avgs)} exp_avgs, {len(exp_avg_sqs)} exp_avg_sqs"
        )
    if step < 1:
        raise ValueError(f"adamw step counter must be >= 1 (it is incremented before the update), got {step}")
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if not (p.shape == g.shape == m.shape == v.shape):
            raise ValueError(
                f"param {tuple(p.shape)}, grad {tuple(g.shape)}, exp_avg {tuple(m.shape)} and exp_avg_sq "
                f"{tuple(v.shape)} must have the same shape; after pruning, slice the optimizer state "
                "with the same indices as the weight (surgery.apply_plan(..., optimizer=opt) does this)"
            )
