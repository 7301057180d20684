"""Next-token loss of a causal LM without holding its full logits.

A decoder's logits are ``tokens × vocab`` (SmolLM2: 49,152 per token), several times the size of
all its other activations; with their log-softmax and gradient they set the peak memory of a
calibration or training step. Where the family allows (adapters.fused_lm_head), the loss is
computed from the last hidden state by the chunked fused kernel instead, and the gradient of the
LM head is produced only if the head requires one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import fused_lm_head
from .kernels import linear_cross_entropy

IGNORE_INDEX = -100


def shifted_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Targets aligned with every position: token t+1 at position t, ignored at the last position."""
    return F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, reduction: str = "mean",
                   head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of predicting tokens 2..L of every row of input_ids (mean or sum over those tokens).

    ``head_weight`` stands in for the LM head's weight in the fused loss: a copy already cast to the autocast
    dtype (:func:`frozen_head_weight`), so micro-batches of one batch do not cast the whole head again each."""
    head = fused_lm_head(model)
    if head is None:
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                               reduction=reduction)
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    return linear_cross_entropy(hidden, head.weight if head_weight is None else head_weight,
                                shifted_targets(input_ids), ignore_index=IGNORE_INDEX, reduction=reduction)


def frozen_head_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The fused LM head's weight cast once to the current autocast dtype, when the head is frozen (no gradient
    to route back through the cast) and autocast is on; else None (the loss then uses the weight as it is)."""
    head = fused_lm_head(model)
    if head is None or head.weight.requires_grad:
        return None
    device_type = head.weight.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return head.weight.to(torch.get_autocast_dtype(device_type))


def causal_lm_loss_through(forward_model: torch.nn.Module, model: torch.nn.Module,
                           input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss through ``forward_model`` (e.g. a DDP wrapper of ``model``), fused where possible.

    The wrapper's own forward runs (so its hooks do), asked for the hidden states and for the logits
    of one position only; the fused kernel then takes the last hidden state and the LM head, and
    backward gives the head (tied or not) its gradient when it requires one.
    """
    head = fused_lm_head(model)
    if head is None:
        return forward_model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    out = forward_model(input_ids=input_ids, use_cache=False, logits_to_keep=1, output_hidden_states=True)
    return linear_cross_entropy(out.hidden_states[-1], head.weight, shifted_targets(input_ids),
                                ignore_index=IGNORE_INDEX)
