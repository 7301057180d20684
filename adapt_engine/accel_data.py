"""Adapt-Accel's data and phase arithmetic: the packed training windows, their split into phases with linearly
growing shares 2(i+1) / (N_P(N_P+1)), and the parameter target of every phase."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data import DataError, load_documents


def phase_shares(interleaves: int) -> list[float]:
    """Share of the training tokens of each phase: 2(i+1) / (N_P(N_P+1)), growing linearly, summing to 1."""
    n = interleaves
    return [2 * (i + 1) / (n * (n + 1)) for i in range(n)]


def phase_targets(original: int, target: int, interleaves: int) -> list[int]:
    """Parameter count after each phase's prune: original·P^(i+1) with P = (target/original)^(1/N_P)."""
    ratio = target / original
    out = [int(round(original * ratio ** ((i + 1) / interleaves))) for i in range(interleaves)]
    out[-1] = target
    return out


def split_counts(total: int, shares: list[float]) -> list[int]:
    """Integer counts proportional to ``shares`` summing exactly to ``total`` (largest remainder)."""
    raw = [total * s for s in shares]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], -i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts



def packed_ids(tokenizer, spec: str | None, split: str) -> torch.Tensor:
    """Every document of a split tokenized and joined by EOS into one 1-D stream (packed sequences)."""
    docs = load_documents(spec, split)
    eos = tokenizer.eos_token_id
    enc = tokenizer(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids: list[int] = []
    for doc in enc:
        ids.extend(doc)
        if eos is not None:
            ids.append(eos)
    if not ids:
        raise DataError(f"the {split} split of '{spec or 'pydoc'}' tokenizes to nothing")
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class DataPlan:
    """The training windows in the order they are consumed, and each phase's slice of them."""

    windows: torch.Tensor  # [N, seq_len]
    bounds: list[tuple[int, int]]  # per phase: [start, end) into windows
    available_windows: int

    def phase(self, i: int) -> torch.Tensor:
        """The windows of phase ``i``."""
        a, b = self.bounds[i]
        return self.windows[a:b]


def plan_data(ids: torch.Tensor, cfg) -> DataPlan:
    """Cut ``ids`` into windows, draw ``train_tokens`` worth without replacement, split into phases (and, with
    ``distill_final_tokens``, that many more for a final stage: one more entry in ``bounds``).

    ``cfg`` gives ``seq_len``, ``train_tokens``, ``phases`` and ``seed`` (an AccelConfig; ``--prune-every`` runs
    have one phase).
    """
    available = ids.numel() // cfg.seq_len
    wanted = available if cfg.train_tokens is None else cfg.train_tokens // cfg.seq_len
    final = getattr(cfg, "distill_final_tokens", 0) // cfg.seq_len  # accel --distill-final-tokens
    if wanted + final > available and final:
        raise DataError(
            f"--train-tokens {cfg.train_tokens:,} plus --distill-final-tokens {cfg.distill_final_tokens:,} need "
            f"{wanted + final:,} windows of {cfg.seq_len} tokens, but the training split has {available:,}; pass more "
            f"text with --train-data, or lower either")
    if wanted > available:
        raise DataError(
            f"--train-tokens {cfg.train_tokens:,} needs {wanted:,} windows of {cfg.seq_len} tokens, but the training "
            f"split has {ids.numel():,} tokens ({available:,} windows). Pass more text with --train-data, or lower "
            f"--train-tokens or --seq-len"
        )
    if wanted < 1:
        raise DataError(f"the training split has {ids.numel()} tokens, less than one --seq-len window")
    gen = torch.Generator().manual_seed(cfg.seed)
    # The final stage's windows follow the phases' in the same permutation: the phases' draw is unchanged.
    order = torch.randperm(available, generator=gen)[:wanted + final]
    windows = ids[: available * cfg.seq_len].view(available, cfg.seq_len)[order].clone()
    counts = split_counts(wanted, phase_shares(cfg.phases)) + ([final] if final else [])
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return DataPlan(windows, bounds, available)


def steps_of(n_windows: int, global_batch: int) -> int:
    """Optimizer steps for ``n_windows`` sequences (the last batch of a phase may be partial)."""
    return -(-n_windows // global_batch)
