"""One Adapt-Accel optimizer step: gradient accumulation over micro-batches with the loss normalised by the
tokens of the whole global batch, bf16 autocast where the device has it, clipping, and a stop on NaN/inf."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from .distributed import Dist, rank_share
from .errors import AdaptEngineError, UsageError
from .lm_loss import causal_lm_loss_through

SINGLE = Dist(0, 1, torch.device("cpu"), owns_group=False)  # one process; its device is unused


class TrainingDivergedError(AdaptEngineError, RuntimeError):
    """Loss or gradient norm became NaN/inf (exit code 3: the settings or data, not the command line)."""

    exit_code = 3


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if mode == "none":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        ok = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    else:
        ok = False
    if mode == "bf16" and not ok:
        raise UsageError(f"--autocast bf16 was requested but {device} has no native bf16; use --autocast none")
    return torch.bfloat16 if ok else None



def train_step(
    train_model, optimizer, batch: torch.Tensor, *, lr: float, micro_batch: int, max_grad_norm: float,
    amp: torch.dtype | None = None, d: Dist = SINGLE, fused_loss_of: torch.nn.Module | None = None,
    loss_fn: Callable[[torch.nn.Module, torch.nn.Module, torch.Tensor], tuple] | None = None,
) -> dict:
    """Forward/backward over one global batch in micro-batches, clip, AdamW. Returns loss and grad norm.

    ``loss_fn(train_model, fused_loss_of, ids) -> (loss, {name: term})`` replaces the next-token loss (the
    distillation loss); its named terms are averaged like the loss and returned under ``terms``.

    With ``fused_loss_of`` (the unwrapped model of ``train_model``) the loss is fused with its LM head
    (kernels.linear_cross_entropy: no batch x seq x vocab logits, the head still gets its gradient).

    Each micro-batch's mean loss is weighted by its share of the predicted tokens of the *global* batch
    (times the world size, as DDP and FSDP average gradients over ranks), so the summed gradient equals that of
    one big batch on one device whatever the world size and however unevenly a partial batch splits.
    """
    n = batch.shape[0]
    tokens_per_seq = batch.shape[1] - 1
    total_tokens = n * tokens_per_seq
    mine = batch[list(rank_share(n, d.rank, d.world))]
    # Every rank runs the same number of micro-batches: DDP syncs gradients on the last backward.
    per_rank = -(-n // d.world)  # the largest share of any rank
    n_micro = max(1, -(-per_rank // micro_batch))
    loss_sum = 0.0
    term_sums: dict[str, float] = {}
    for k in range(n_micro):
        ids = mine[k * micro_batch:(k + 1) * micro_batch]
        weight = ids.shape[0] * tokens_per_seq / total_tokens * d.world
        if ids.shape[0] == 0:  # this rank ran out of sequences: a zero-weight pass keeps DDP in step
            ids = batch[:1]
            weight = 0.0
        ids = ids.to(d.device, non_blocking=True)
        sync = k == n_micro - 1  # gradients are reduced across ranks on the last micro-batch only
        ctx = contextlib.nullcontext()
        if hasattr(train_model, "set_requires_gradient_sync"):  # FSDP2
            train_model.set_requires_gradient_sync(sync)
        elif d.world > 1 and not sync:  # DDP
            ctx = train_model.no_sync()
        with ctx:
            with torch.autocast(d.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                if loss_fn is not None:
                    loss, terms = loss_fn(train_model, fused_loss_of, ids)
                    for name, value in terms.items():
                        term_sums[name] = term_sums.get(name, 0.0) + float(value) * weight / d.world
                elif fused_loss_of is not None:
                    loss = causal_lm_loss_through(train_model, fused_loss_of, ids)
                else:
                    loss = train_model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss * weight).backward()
        loss_sum += float(loss.detach()) * weight / d.world
    # Decide on NaN/inf from values every rank shares (the summed loss, the all-reduced gradients' norm),
    # so that all ranks stop together instead of one rank leaving the others waiting in a collective.
    names = sorted(term_sums)
    loss_global, *term_values = d.sum([loss_sum, *(term_sums[k] for k in names)])
    norm = torch.nn.utils.clip_grad_norm_(train_model.parameters(), max_grad_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
    if not math.isfinite(loss_global):
        raise TrainingDivergedError(f"training loss became {loss_global}")
    if not math.isfinite(grad_norm):
        raise TrainingDivergedError(f"gradient norm became {grad_norm}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out = {"loss": loss_global, "grad_norm": grad_norm, "tokens": n * batch.shape[1]}
    if loss_fn is not None:
        out["terms"] = dict(zip(names, term_values))
    return out
