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
from dataclasses import dataclass

import torch

# Elements per program: BLOCK lanes × ITERS iterations (a 16 Ki-element chunk keeps launches few
# for big matrices while a 576-element norm still gets exactly one program).
BLOCK = 1024
ITERS = 16


@dataclass(frozen=True)
class AdamWHyper:
    """The hyperparameters of one AdamW step (meanings as in ``torch.optim.AdamW``), shared by every backend."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    def bias_corrections(self, step: int) -> tuple[float, float]:
        """``(1 − β1^t, √(1 − β2^t))`` of step ``t``."""
        return 1.0 - self.beta1**step, math.sqrt(1.0 - self.beta2**step)


@dataclass
class AdamWTensors:
    """The four parallel tensor lists of one multi-tensor step: parameters, their grads and both moments."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]

    def rows(self):
        """``(param, grad, exp_avg, exp_avg_sq)`` per parameter."""
        return zip(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs)

    def check(self, step: int) -> None:
        """Clear errors for list lengths, the step counter, and shapes that differ (state not sliced with a
        weight)."""
        lengths = [len(self.params), len(self.grads), len(self.exp_avgs), len(self.exp_avg_sqs)]
        if len(set(lengths)) != 1:
            raise ValueError(
                f"adamw step needs one grad and two moments per param, got {lengths[0]} params, "
                f"{lengths[1]} grads, {lengths[2]} exp_avgs, {lengths[3]} exp_avg_sqs"
            )
        if step < 1:
            raise ValueError(f"adamw step counter must be >= 1 (it is incremented before the update), got {step}")
        for p, g, m, v in self.rows():
            if not (p.shape == g.shape == m.shape == v.shape):
                raise ValueError(
                    f"param {tuple(p.shape)}, grad {tuple(g.shape)}, exp_avg {tuple(m.shape)} and exp_avg_sq "
                    f"{tuple(v.shape)} must have the same shape; after pruning, slice the optimizer state "
                    "with the same indices as the weight (surgery.apply_plan(..., optimizer=opt) does this)"
                )


def adamw_step_reference(tensors: AdamWTensors, step: int, hyper: AdamWHyper) -> None:
    """Plain-torch AdamW update in place (float32 math, results cast back to each tensor's dtype)."""
    tensors.check(step)
    h = hyper
    bc1, bc2_sqrt = h.bias_corrections(step)
    for p, g, m, v in tensors.rows():
        p32, g32, m32, v32 = p.float(), g.float(), m.float(), v.float()
        p32 = p32 * (1.0 - h.lr * h.weight_decay)
        m32 = m32 + (1.0 - h.beta1) * (g32 - m32)
        v32 = v32 * h.beta2 + (1.0 - h.beta2) * g32 * g32
        denom = v32.sqrt() / bc2_sqrt + h.eps
        p32 = p32 - (h.lr / bc1) * (m32 / denom)
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)
