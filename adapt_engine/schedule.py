"""Warmup–stable–decay (WSD) learning rate: one schedule spanning every Adapt-Accel phase.

Adapt-Accel (paper, Appendix A) splits a single WSD schedule across its interleaved training phases:
linear warmup over the first 5 % of all optimizer steps, the maximum rate in the middle, and a final
linear decay to the minimum over the last 10 %. Pruning between phases does not restart it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WSDSchedule:
    """Learning rate of optimizer step ``s`` (0-based) out of ``total_steps``."""

    total_steps: int
    max_lr: float = 2e-5
    min_lr: float = 2e-6
    warmup: float = 0.05  # share of all steps
    decay: float = 0.10  # share of all steps

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs at least one optimizer step, got total_steps={self.total_steps}")
        for name in ("warmup", "decay"):
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"--{name} is a share of all optimizer steps in [0, 1], got {share}")
        if self.warmup + self.decay > 1.0:
            raise ValueError(
                f"--warmup {self.warmup} plus --decay {self.decay} exceed 1: the two ramps would overlap"
            )
        if not (self.max_lr > 0 and 0 <= self.min_lr <= self.max_lr):
            raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.max_lr}, min_lr={self.min_lr}")

    @property
    def warmup_steps(self) -> int:
        """Optimizer steps spent warming up (rounded up so any warmup share > 0 gives at least one)."""
        return math.ceil(self.warmup * self.total_steps)

    @property
    def decay_steps(self) -> int:
        """Optimizer steps of the final decay (rounded up, never overlapping the warmup)."""
        return min(math.ceil(self.decay * self.total_steps), self.total_steps - self.warmup_steps)

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the schedule's {self.total_steps} steps")
        w, d = self.warmup_steps, self.decay_steps
        if step < w:  # linear ramp ending at max_lr on the last warmup step
            return self.max_lr * (step + 1) / w
        decay_start = self.total_steps - d
        if step < decay_start:
            return self.max_lr
        # linear from max_lr down to min_lr, reached exactly on the last step
        frac = (step - decay_start + 1) / d
        return self.max_lr + (self.min_lr - self.max_lr) * frac

    def state_dict(self) -> dict:
        """Plain dict for checkpoints."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> WSDSchedule:
        """Inverse of :meth:`state_dict`."""
        return cls(**state)
