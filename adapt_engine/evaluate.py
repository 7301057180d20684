"""Perplexity over non-overlapping windows of held-out text."""

from __future__ import annotations

import math

import torch

from .errors import UsageError
from .lm_loss import causal_lm_loss


def eval_batches(ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
                 max_tokens: int | None = None) -> list[torch.Tensor]:
    """Consecutive non-overlapping ``seq_len`` windows of ``ids``, equal-length ones batched together.

    Each window predicts its own tokens 2..L (the first token of a window has no context); a trailing
    partial window shorter than 2 is dropped.
    """
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2 (or omitted for all the text), got {max_tokens}")
    ids = ids.flatten()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise UsageError(f"need at least 2 tokens of text to evaluate, got {ids.numel()}; pass more text")
    windows = [ids[i:i + seq_len] for i in range(0, ids.numel(), seq_len)]
    windows = [w for w in windows if w.numel() >= 2]
    # Group equal-length windows into batches (only the last window can be shorter).
    full = [w for w in windows if w.numel() == seq_len]
    tail = [w for w in windows if w.numel() != seq_len]
    batches = [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
    return batches + [w[None] for w in tail]


def perplexity_result(nll: float, batches: list[torch.Tensor]) -> dict:
    """The perplexity record of a summed loss over ``batches`` (``tokens`` = windows × (length − 1))."""
    count = sum(b[:, 1:].numel() for b in batches)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
               max_tokens: int | None = None) -> dict:
    """Token-weighted perplexity over consecutive non-overlapping ``seq_len`` windows of ``ids``
    (see :func:`eval_batches`)."""
    batches = eval_batches(ids, seq_len, batch_size, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = 0.0
    for batch in batches:
        # Fused with the LM head where the family allows: batch × seq × vocab logits are never held.
        nll += float(causal_lm_loss(model, batch.to(device), reduction="sum"))
    model.train(was_training)
    return perplexity_result(nll, batches)
