"""Adapt-Accel: interleaved pruning and recovery training (``adapt-engine accel``).

The loop reads top to bottom::

    run = prepare (fresh or resumed: one branch) → for each phase: prune_phase, train_phase, evaluate,
          save_checkpoint(state) → finish

* :class:`AccelConfig` — every setting (the paper's defaults: A = 0.02, N_P = 20, WSD schedule 5 % warmup /
  10 % decay, lr 2e-5 → 2e-6, global batch 128); the pruner's own settings are a nested :class:`PruneSettings`.
* :class:`AccelRun` — what the run works with but never changes: settings, rank, folders, tokenizer, data
  plan (``accel_data.py``), calibration sample, per-phase targets.
* :class:`AccelState` — what a checkpoint restores: model, optimizer, schedule, pruner, training-gradient
  scores, position, report so far, with ``state_dict()``/``load_state_dict()``.

One optimizer step is ``training.train_step``; DDP/FSDP2 wrapping is ``distributed.py``; checkpoints
(``checkpoint.py``) are atomic and taken at every phase boundary and every ``--checkpoint-every`` steps;
``--resume`` continues bit-for-bit where a killed run stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .accel_data import DataPlan, packed_ids, phase_shares, phase_targets, plan_data, split_counts, steps_of
from .adapters import DecoderAdapter, count_params
from .args import AccelConfig
from .checkpoint import CheckpointError, check_compatible, latest_checkpoint, load_checkpoint, rng_state, set_rng_state
from .data import sample_windows
from .distill_loss import DistillLoss
from .distributed import (
    Dist,
    Session,
    calibration_share,
    check_same_shapes,
    rank_share,
    setup_distributed,
    start_session,
    sync_back,
)
from .errors import AdaptEngineError, UsageError
from .evaluate import perplexity
from .fsio import atomic_write
from .groups import GroupScores, tap_targets
from .models import load_model, parse_dtype
from .optim import build_optimizer
from .options import check_output
from .pruner import AdaptPruner
from .report import RunReport, finish_run, peak_memory_mb, plot_progress
from .schedule import WSDSchedule
from .settings import add_flags, flat_dict, from_args
from .teachers import ORIGINAL, ResidentTeacher, SnapshotStore, select_teacher, snapshot_due, unreachable
from .training import TrainingDivergedError, autocast_dtype, train_step

__all__ = [
    "AccelConfig", "AccelResult", "AccelRun", "AccelState", "TrainingDivergedError", "add_accel_arguments",
    "config_from_args", "phase_shares", "phase_targets", "plan_data", "rank_share", "run", "run_accel",
    "split_counts", "steps_of", "train_step", "DataPlan",
]

SCORE_KINDS = ("q_heads", "kv_heads", "mlp")


class ExistingRunError(AdaptEngineError, FileExistsError):
    """A fresh start where an earlier run left checkpoints: --resume or --overwrite must say which is meant."""


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


def add_accel_arguments(p) -> None:
    """Flags of `adapt-engine accel` (generated from :class:`AccelConfig`)."""
    add_flags(p, AccelConfig)


def config_from_args(args) -> AccelConfig:
    """AccelConfig from parsed CLI arguments."""
    return from_args(AccelConfig, args)


# ---------------------------------------------------------------------------------------------------------
# The run and its state
# ---------------------------------------------------------------------------------------------------------


class MetricsLog:
    """Append-only JSONL of every step and phase event (rank 0), truncated to the checkpoint on resume."""

    def __init__(self, path: Path, enabled: bool, keep_records: int | None):
        self.path = path
        self.enabled = enabled
        self.records: list[dict] = []
        if enabled:
            if keep_records is not None and path.is_file():
                lines = path.read_text().splitlines()[:keep_records]
                self.records = [json.loads(x) for x in lines]
            atomic_write(path, self.text())

    def text(self) -> str:
        """Every record as JSONL."""
        return "".join(json.dumps(r) + "\n" for r in self.records)

    def write(self, record: dict) -> None:
        """Append one record (flushed at once so `tail -f` shows progress), stamped with the wall time."""
        record = {**record, "time": time.time()}
        self.records.append(record)
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


@dataclass
class AccelRun:
    """What a run works with but never changes once prepared."""

    cfg: AccelConfig
    d: Dist
    run_dir: Path
    ckpt_dir: Path
    t_start: float
    fingerprint: dict
    tokenizer: object = None
    plan: DataPlan | None = None
    calib: torch.Tensor | None = None
    val_ids: torch.Tensor | None = None
    phase_steps: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    amp: torch.dtype | None = None
    metrics: MetricsLog | None = None
    snapshots: SnapshotStore | None = None  # --distill: the teachers on disk
    teacher: ResidentTeacher | None = None  # --distill: the one teacher in memory

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all phases."""
        return sum(self.phase_steps)

    @property
    def stages(self) -> int:
        """Training stages: the N_P phases, and the final distillation stage when there is one."""
        return len(self.plan.bounds)


def no_teachers() -> dict:
    """The distillation bookkeeping of a run without snapshots yet (and of --distill none)."""
    return {"snapshots": [], "teacher": None}


def new_position() -> dict:
    """Where a fresh run starts: phase 0, not yet pruned, no step taken."""
    return {"phase": 0, "pruned": False, "step_in_phase": 0, "global_step": 0, "tokens": 0}


@dataclass
class AccelState:
    """Everything a checkpoint restores. ``state_dict()`` is a plain tree of tensors, numbers, strings, lists."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: WSDSchedule
    pruner: AdaptPruner
    scores: GroupScores | None = None  # training-gradient group scores (--saliency train)
    position: dict = field(default_factory=new_position)
    summary: dict = field(default_factory=dict)  # the report so far: initial size, widths and ppl, phases
    # --distill: the snapshots on disk ({"name", "params", "phase"}) and the name of the active teacher
    distill: dict = field(default_factory=no_teachers)

    def state_dict(self) -> dict:
        """The trainer state written into a checkpoint beside the model."""
        saliency = None if self.scores is None else {k: [t.cpu() for t in getattr(self.scores, k)]
                                                     for k in SCORE_KINDS}
        if self.scores is not None and self.scores.stem is not None:
            saliency["stem"] = self.scores.stem.cpu()
        return {"position": dict(self.position), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "pruner": self.pruner.state_dict(), "saliency": saliency,
                "summary": self.summary, "distill": self.distill}

    def load_state_dict(self, tree: dict) -> None:
        """Restore what :meth:`state_dict` wrote (the model itself comes from the checkpoint's model folder)."""
        self.pruner.load_state_dict(tree["pruner"])
        self.optimizer.load_state_dict(tree["optimizer"])
        self.position = dict(tree["position"])
        self.summary = tree["summary"]
        self.distill = tree.get("distill") or no_teachers()
        if tree.get("saliency") is not None:
            self.scores = GroupScores(**tree["saliency"])
            self.optimizer.track_saliency(saliency_targets(self.model, self.scores))


@dataclass
class AccelResult:
    """What a run leaves behind in memory (the same is saved to --output)."""

    model: torch.nn.Module
    tokenizer: object
    report: dict


def layer_widths(model) -> list[dict]:
    """Every decoder layer's head count, KV head count and MLP width."""
    return [asdict(s) for s in DecoderAdapter(model).shapes()]


def saliency_targets(model, scores: GroupScores) -> dict:
    """Map every prunable parameter to its (group-score vector, pruned dim, group size) entries for the optimizer
    (stem channels too when ``scores`` has a stem vector)."""
    return tap_targets(DecoderAdapter(model), scores)


def new_optimizer(cfg: AccelConfig, model: nn.Module):
    """AdamW over ``model`` with the run's settings."""
    return build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, backend=cfg.optimizer)


def shard_optimizer(cfg: AccelConfig) -> Callable[[nn.Module], torch.optim.Optimizer] | None:
    """FSDP2: the builder of the sharded copy's optimizer (None without --fsdp)."""
    if not cfg.fsdp:
        return None
    backend = "torch-foreach" if cfg.optimizer == "auto" else cfg.optimizer
    return lambda shard: build_optimizer(shard, lr=cfg.lr, weight_decay=cfg.weight_decay, backend=backend)


def heldout_ppl(run: AccelRun, model) -> float | None:
    """Validation perplexity; under DDP each rank scores its share of the windows and the sums are combined."""
    cfg, d, val_ids = run.cfg, run.d, run.val_ids
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


def log(run: AccelRun, message: str) -> None:
    """A progress line on stderr (rank 0 only)."""
    if run.d.main:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.expanduser().absolute().resolve(), b.expanduser().absolute().resolve()
    return a == b or a in b.parents or b in a.parents


def open_run_folders(cfg: AccelConfig, d: Dist) -> tuple[Path, Path, Path | None]:
    """Check --output and the checkpoint folder before anything is loaded; returns (run dir, checkpoint dir,
    the checkpoint to resume or None). A fresh start clears only checkpoints an earlier run of ours wrote."""
    run_dir = cfg.run_dir()
    ckpt_dir = run_dir / "checkpoints"
    if _overlaps(run_dir, Path(cfg.output)):
        raise UsageError(f"--checkpoint-dir '{run_dir}' and --output '{cfg.output}' overlap; give them separate "
                         f"folders")
    if cfg.model and Path(cfg.model).expanduser().exists() and _overlaps(run_dir, Path(cfg.model)):
        raise UsageError(f"--checkpoint-dir '{run_dir}' overlaps --model '{cfg.model}'; choose another folder")
    if d.main:
        check_output(cfg.output, overwrite=cfg.overwrite, model=cfg.model, dtype=cfg.dtype)
    # read-only here, so every rank raises it together; open_checkpoint_dir repeats it on rank 0
    checkpoint.check_checkpoint_dir(run_dir)
    checkpoint.check_checkpoint_dir(ckpt_dir)
    latest = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    if cfg.resume and latest is None:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
    if not cfg.resume and latest is not None and not cfg.overwrite:
        raise ExistingRunError(f"{ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue it or "
                               f"--overwrite to start over")
    d.barrier()
    if d.main:
        checkpoint.open_checkpoint_dir(run_dir, resume=True)  # marks it ours; holds the metrics log
        if not cfg.no_checkpoints or ckpt_dir.is_dir():
            checkpoint.open_checkpoint_dir(ckpt_dir, resume=cfg.resume)
    d.barrier()
    return run_dir, ckpt_dir, latest if cfg.resume else None


def load_start(run: AccelRun, latest: Path | None) -> tuple[nn.Module, dict | None]:
    """The model to start from — the checkpoint's pruned one, or the original — and the trainer state."""
    cfg = run.cfg
    dtype = parse_dtype(cfg.dtype)
    if dtype != torch.float32:
        log(run, f"warning: --dtype {cfg.dtype} keeps the weights themselves in low precision; updates of lr "
            f"{cfg.lr:g} mostly round away. float32 weights with bf16 autocast (the default) train properly.")
    # With FSDP2 the whole model only ever lives in CPU memory (it need not fit one device); each phase
    # trains a sharded copy. Otherwise it lives on the training device.
    device = "cpu" if cfg.fsdp else str(run.d.device)
    tree = None
    if latest is not None:
        model, tree = load_checkpoint(latest, device=device, dtype=dtype)
        check_compatible(tree["fingerprint"], run.fingerprint)
        run.tokenizer = checkpoint.load_checkpoint_tokenizer(latest)
        log(run, f"resuming from {latest} (phase {tree['position']['phase']}, "
            f"step {tree['position']['global_step']})")
    else:
        log(run, f"loading model {cfg.loading.model_name} ...")
        model, run.tokenizer = load_model(cfg.model, device=device, dtype=dtype)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run.amp = autocast_dtype(cfg.autocast, run.d.device)
    return model, tree


def prepare_data(run: AccelRun) -> None:
    """Training windows and their phases, this rank's calibration batches, the validation tokens."""
    cfg, d = run.cfg, run.d
    train_ids = packed_ids(run.tokenizer, cfg.train_data, "train")
    run.plan = plan_data(train_ids, cfg)
    calib = sample_windows(train_ids, cfg.calib_samples, cfg.calib_seq_len, seed=cfg.seed + 1)
    run.calib = calibration_share(calib, cfg.calib_batch_size, d)
    run.val_ids = packed_ids(run.tokenizer, cfg.train_data, "heldout")[: cfg.val_tokens] if cfg.val_tokens else None
    run.phase_steps = [steps_of(b - a, cfg.global_batch) for a, b in run.plan.bounds]
    if run.total_steps == 0:
        raise UsageError("no training steps: raise --train-tokens")
    if cfg.prune_every and run.total_steps <= cfg.prune_every:
        raise UsageError(f"--prune-every {cfg.prune_every} slices after every {cfg.prune_every} optimizer steps, but "
                         f"the run has {run.total_steps}: no slice would have training after it. Lower --prune-every "
                         f"or raise --train-tokens")
    empty = sum(1 for s in run.phase_steps if s == 0)
    if empty:
        log(run, f"warning: {empty} of {cfg.interleaves} phases get no training window ({run.plan.windows.shape[0]} "
            f"windows for {cfg.interleaves} phases); raise --train-tokens or lower --interleaves")


def build_state(run: AccelRun, model: nn.Module, tree: dict | None) -> AccelState:
    """Pruner, optimizer and schedule over ``model``, restored from ``tree`` when resuming; the phase targets."""
    cfg = run.cfg
    pruner = AdaptPruner(model, replace(cfg.prune, steps=cfg.steps_per_phase), run.calib)
    schedule = WSDSchedule(run.total_steps, cfg.lr, cfg.min_lr, cfg.warmup, cfg.decay)
    state = AccelState(model, new_optimizer(cfg, model), schedule, pruner)
    if tree is not None:  # the checkpoint's model is already pruned: restore the original accounting
        state.load_state_dict(tree)
    else:
        state.summary = {"phases": [], "ppl_initial": None, "params_initial": pruner.original_total,
                         "widths_initial": layer_widths(model)}
    original = pruner.original_total
    target = cfg.target_params if cfg.target_params is not None else pruner.target_from_sparsity(cfg.sparsity)
    if target > original:
        raise UsageError(f"--target-params {target:,} exceeds the model's {original:,} parameters")
    if target < pruner.min_params():
        raise UsageError(f"--target-params {target:,} is below the smallest reachable size {pruner.min_params():,}")
    run.targets = phase_targets(original, target, cfg.phases)
    return state


def teacher_dtype(cfg: AccelConfig, device: torch.device) -> torch.dtype:
    """--teacher-dtype: auto is bfloat16 where the device runs it natively (as --autocast auto decides)."""
    if cfg.teacher_dtype == "auto":
        return autocast_dtype("auto", device) or torch.float32
    return parse_dtype(cfg.teacher_dtype)


def open_teachers(run: AccelRun, state: AccelState, *, fresh: bool) -> None:
    """--distill: the snapshot folder (a fresh run writes the original model into it as the first teacher)."""
    cfg, d = run.cfg, run.d
    run.snapshots = SnapshotStore(run.run_dir / "snapshots")
    if d.main:
        run.snapshots.open(fresh=fresh)
        if fresh:
            run.snapshots.write(state.model, run.tokenizer, ORIGINAL)
    d.barrier()
    if fresh:
        state.distill = {"snapshots": [{"name": ORIGINAL, "params": state.pruner.original_total, "phase": -1}],
                         "teacher": None}
    run.teacher = ResidentTeacher(run.snapshots, str(d.device), teacher_dtype(cfg, d.device))


def restore_rng(run: AccelRun, tree: dict | None) -> None:
    """The checkpoint's RNG streams (same world size), or the run's seed on a fresh start."""
    d = run.d
    if tree is None:
        torch.manual_seed(run.cfg.seed + d.rank)
        return
    rngs = tree["rng"]
    if len(rngs) == d.world:
        set_rng_state(rngs[d.rank])
    else:
        log(run, f"warning: checkpoint was written by {len(rngs)} ranks, resuming on {d.world}: RNG streams "
            f"restart (exact continuation needs the same world size)")


def prepare(cfg: AccelConfig, d: Dist, t_start: float) -> tuple[AccelRun, AccelState]:
    """Everything before the first phase, for a fresh start and a resume alike."""
    run_dir, ckpt_dir, latest = open_run_folders(cfg, d)
    run = AccelRun(cfg, d, run_dir, ckpt_dir, t_start, cfg.fingerprint())
    model, tree = load_start(run, latest)
    prepare_data(run)
    state = build_state(run, model, tree)
    if cfg.distill != "none":
        open_teachers(run, state, fresh=tree is None)
    restore_rng(run, tree)
    run.metrics = MetricsLog(run_dir / "metrics.jsonl", d.main, tree["n_records"] if tree is not None else None)
    summary, original = state.summary, state.pruner.original_total
    if summary["ppl_initial"] is None and cfg.val_tokens:
        summary["ppl_initial"] = heldout_ppl(run, model)
        run.metrics.write({"event": "eval", "phase": -1, "global_step": 0, "params": original,
                           "ppl": summary["ppl_initial"]})
    target = run.targets[-1]
    how = (f"{cfg.slice_groups} groups every {cfg.prune_every} optimizer steps" if cfg.prune_every else
           f"{cfg.interleaves} phases (P = {(target / original) ** (1 / cfg.interleaves):.4f} per phase)")
    log(run, f"Adapt-Accel: {original:,} -> {target:,} params in {how}, {run.total_steps} optimizer "
        f"steps over {run.plan.windows.shape[0]:,} windows x {cfg.seq_len} tokens, "
        f"initial held-out ppl {summary['ppl_initial'] or float('nan'):.3f}")
    return run, state


# ---------------------------------------------------------------------------------------------------------
# One phase: prune, train, evaluate, checkpoint
# ---------------------------------------------------------------------------------------------------------


def save_checkpoint(run: AccelRun, state: AccelState) -> None:
    """Atomic checkpoint of everything needed to continue exactly (rank 0 writes, all ranks wait)."""
    d = run.d
    if run.cfg.no_checkpoints:
        return
    rngs: list = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if d.main:
        tree = {**state.state_dict(), "fingerprint": run.fingerprint, "rng": rngs,
                "n_records": len(run.metrics.records)}
        checkpoint.save_checkpoint(run.ckpt_dir, state.position["global_step"], state.model, run.tokenizer, tree)
    d.barrier()


def prune_phase(run: AccelRun, state: AccelState) -> None:
    """Prune to this phase's target (moments sliced along, or a new optimizer with --reset-optimizer)."""
    cfg, pos = run.cfg, state.position
    i, t0 = pos["phase"], time.perf_counter()
    group_scores = state.scores if (state.scores is not None and cfg.saliency == "train") else None
    state.optimizer.clear_saliency()
    records = state.pruner.prune_to(run.targets[i], cfg.steps_per_phase,
                                    optimizer=None if cfg.reset_optimizer else state.optimizer,
                                    group_scores=group_scores)
    check_same_shapes(state.model, run.d)
    if cfg.reset_optimizer:
        state.optimizer = new_optimizer(cfg, state.model)
    start_tap(run, state)
    teacher = choose_teacher(run, state)
    pos["pruned"] = True
    run.metrics.write({"event": "prune", "phase": i, "global_step": pos["global_step"], "tokens": pos["tokens"],
                       "params": count_params(state.model), "target": run.targets[i],
                       "seconds": time.perf_counter() - t0, "sub_steps": len(records),
                       "saliency": "train" if group_scores is not None else "calib",
                       **({"teacher": teacher["name"], "teacher_params": teacher["params"]} if teacher else {})})


def start_tap(run: AccelRun, state: AccelState) -> None:
    """--saliency train: fresh zero scores for the model's current shapes (stem channels too with --groups
    ...,stem), accumulated by the optimizer from here on; otherwise none."""
    state.scores = None
    if run.cfg.saliency == "train":
        state.scores = GroupScores.zeros(state.pruner.adapter, device=run.d.device, stem=state.pruner.stem)
        state.optimizer.track_saliency(saliency_targets(state.model, state.scores))


def begin_slices(run: AccelRun, state: AccelState) -> None:
    """--prune-every: the one training stage starts unpruned; the tap (and a --distill kd teacher) start now."""
    state.position["pruned"] = True
    start_tap(run, state)
    choose_teacher(run, state)


def slice_due(run: AccelRun, state: AccelState) -> bool:
    """--prune-every: whether a slice follows the optimizer step just taken (every K steps, while training is left
    after it and the pruning period has not ended)."""
    cfg, pos = run.cfg, state.position
    g = pos["global_step"]
    return (bool(cfg.prune_every) and not pos.get("slices_done", False) and g % cfg.prune_every == 0
            and g < run.total_steps)


def prune_slice(run: AccelRun, state: AccelState) -> None:
    """--prune-every: remove the --slice-groups cheapest groups of the global ranking (scored from the training
    gradients since the last slice, or by a calibration pass with --saliency calib), AdamW state cut along. The
    last slice point with training after it removes whatever is left down to the target, so the run always
    lands there (within one removable group, as `prune` does)."""
    cfg, pos = run.cfg, state.position
    t0 = time.perf_counter()
    target = run.targets[-1]
    closing = pos["global_step"] + cfg.prune_every >= run.total_steps
    group_scores = state.scores if cfg.saliency == "train" else None
    state.optimizer.clear_saliency()
    rec = state.pruner.step(target, None if cfg.reset_optimizer else state.optimizer, group_scores,
                            max_groups=None if closing else cfg.slice_groups)
    check_same_shapes(state.model, run.d)
    if cfg.reset_optimizer:
        state.optimizer = new_optimizer(cfg, state.model)
    groups = sum(n for _, n in rec["removal_order"])
    # a slice short of its groups met the target or ran out of groups that fit: the pruning period is over
    pos["slices_done"] = closing or groups < cfg.slice_groups
    pos["slices"] = pos.get("slices", 0) + 1
    if pos["slices_done"]:
        state.optimizer.clear_saliency()
        state.scores = None
    else:
        start_tap(run, state)
    forced = closing and groups > cfg.slice_groups
    if forced:
        log(run, f"warning: --prune-every {cfg.prune_every} with --slice-groups {cfg.slice_groups} had not reached "
            f"the target by step {pos['global_step']} (the last slice with training after it); that slice removed "
            f"{groups} groups to land on it. Raise --slice-groups or --train-tokens, or lower --prune-every")
    record = {"slice": pos["slices"], "global_step": pos["global_step"], "tokens": pos["tokens"],
              "params": rec["params"], "target": target, "groups": groups, "removed_params": rec["removed_params"],
              "removal_order": rec["removal_order"], "hidden_size": rec["hidden_size"], "forced": forced,
              "last": pos["slices_done"], "saliency": "train" if group_scores is not None else "calib"}
    state.summary.setdefault("slices", []).append(record)
    run.metrics.write({"event": "slice", "phase": pos["phase"], **record, "seconds": time.perf_counter() - t0})


def choose_teacher(run: AccelRun, state: AccelState) -> dict | None:
    """--distill: the teacher of the just-pruned student (kd: the original; progressive: NutePrune's rule), and
    the snapshots no later student can use deleted from disk."""
    cfg, book = run.cfg, state.distill
    if cfg.distill == "none":
        return None
    original = state.pruner.original_total
    snaps = book["snapshots"]
    if cfg.distill == "kd":
        teacher = next(s for s in snaps if s["name"] == ORIGINAL)
    else:
        teacher = select_teacher(snaps, count_params(state.model), original, cfg.distill_gap)
        # the final stage distils from every snapshot again: keep them all for it
        gone = [] if cfg.distill_final_tokens else unreachable(snaps, teacher, original)
        book["snapshots"] = [s for s in snaps if s not in gone]
        if run.d.main:
            for s in gone:
                run.snapshots.delete(s["name"])
    book["teacher"] = teacher["name"]
    return teacher


def take_snapshot(run: AccelRun, state: AccelState) -> None:
    """--distill progressive: after a phase, save the model as a future teacher once it has shrunk by
    --snapshot-interval since the newest snapshot (rank 0 writes it, every rank waits)."""
    cfg, book = run.cfg, state.distill
    if cfg.distill != "progressive" or state.position["phase"] >= cfg.interleaves:
        return  # after the last prune the model is the student's size: no one's teacher
    params, original = count_params(state.model), state.pruner.original_total
    if not snapshot_due(book["snapshots"], params, original, cfg.snapshot_interval):
        return
    phase = state.position["phase"] - 1  # evaluate has moved the position to the next phase
    name = f"snapshot-phase-{phase + 1:03d}"
    if run.d.main:
        run.snapshots.write(state.model, run.tokenizer, name)
    run.d.barrier()
    book["snapshots"].append({"name": name, "params": params, "phase": phase})
    run.metrics.write({"event": "snapshot", "phase": phase, "global_step": state.position["global_step"],
                       "name": name, "params": params})


def _diverged(run: AccelRun, state: AccelState, err: TrainingDivergedError, lr: float) -> TrainingDivergedError:
    last = latest_checkpoint(run.ckpt_dir) if run.ckpt_dir.is_dir() else None
    where = (f"the last good checkpoint is {last} (continue with --resume after lowering --lr)" if last
             else "no checkpoint was written yet")
    return TrainingDivergedError(
        f"{err} at phase {state.position['phase'] + 1}, step {state.position['global_step']} (lr {lr:.3g}); "
        f"stopping. {where}. Lower --lr or --max-grad-norm, or check the data")


def train_one_step(run: AccelRun, state: AccelState, session: Session, windows: torch.Tensor,
                   params: int, loss_fn: DistillLoss | None = None) -> tuple[dict, int]:
    """One optimizer step of the phase's next global batch; returns (and logs) its metrics record, and the
    tokens it trained on."""
    cfg, pos = run.cfg, state.position
    s = pos["step_in_phase"]
    batch = windows[s * cfg.global_batch:(s + 1) * cfg.global_batch]
    lr = state.schedule.lr(pos["global_step"])
    t0 = time.perf_counter()
    try:
        # The fused loss under FSDP2 too (its root keeps the head gathered, distributed._start_fsdp): the plain
        # loss rounds differently under bf16 autocast, so FSDP2 would drift from one process and from DDP.
        out = train_step(session.module, session.optimizer, batch, lr=lr, micro_batch=cfg.micro_batch,
                         max_grad_norm=cfg.max_grad_norm, amp=run.amp, d=run.d,
                         fused_loss_of=session.module if session.fsdp else state.model, loss_fn=loss_fn)
    except TrainingDivergedError as err:
        raise _diverged(run, state, err, lr) from None
    dt = time.perf_counter() - t0
    pos["step_in_phase"] += 1
    pos["global_step"] += 1
    pos["tokens"] += out["tokens"]
    rec = {"event": "step", "phase": pos["phase"], "global_step": pos["global_step"], "tokens": pos["tokens"],
           "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"], "tokens_per_s": out["tokens"] / dt,
           "params": params, **out.get("terms", {})}
    if loss_fn is not None:
        rec["teacher"] = state.distill["teacher"]
    run.metrics.write(rec)
    return rec, out["tokens"]


def final_teachers(state: AccelState) -> list[dict]:
    """The final stage's teachers in the order they teach: every snapshot from the smallest up to the original."""
    return sorted(state.distill["snapshots"], key=lambda s: (s["params"], s["name"]))


def final_stage_teacher(run: AccelRun, state: AccelState) -> str:
    """The teacher of the final stage's current step: the stage's steps split evenly over :func:`final_teachers`,
    counted from the end, so the last share always distils from the original model (NutePrune's second stage);
    with fewer steps than teachers the smallest teachers are the ones left out."""
    seq = final_teachers(state)
    k, n = len(seq), max(1, run.phase_steps[run.cfg.interleaves])
    return seq[k - 1 - (n - 1 - state.position["step_in_phase"]) * k // n]["name"]


def begin_final_stage(run: AccelRun, state: AccelState) -> None:
    """--distill-final-tokens: no prune; log the sequence of teachers the stage will use."""
    pos = state.position
    pos["pruned"] = True
    run.metrics.write({"event": "final_stage", "phase": pos["phase"], "global_step": pos["global_step"],
                       "tokens": pos["tokens"], "teachers": [s["name"] for s in final_teachers(state)]})


def phase_loss(run: AccelRun, state: AccelState) -> DistillLoss | None:
    """--distill: the loss against this phase's teacher (loaded unless already resident); None: cross-entropy."""
    cfg = run.cfg
    if cfg.distill == "none":
        return None
    if state.position["phase"] >= cfg.phases:
        state.distill["teacher"] = final_stage_teacher(run, state)
    teacher = run.teacher.get(state.distill["teacher"])
    return DistillLoss(teacher, cfg.kd_temperature, cfg.kd_layer_weight, cfg.ce_weight)


def train_phase(run: AccelRun, state: AccelState, on_step: Callable[[dict], None] | None) -> int:
    """Train on this phase's windows (from where a resumed run stopped); returns the phase's step count."""
    cfg, pos = run.cfg, state.position
    i = pos["phase"]
    session = start_session(state.model, state.optimizer, run.d, shard_optimizer(cfg))
    session.module.train()
    windows, n_steps = run.plan.phase(i), run.phase_steps[i]
    final = i >= cfg.phases
    label = (f"training, pruning every {cfg.prune_every} steps" if cfg.prune_every
             else f"phase {i + 1}/{cfg.interleaves}")
    bar = tqdm(total=windows.shape[0] * cfg.seq_len, initial=pos["step_in_phase"] * cfg.global_batch * cfg.seq_len,
               desc="final distillation" if final else label, unit="tok",
               unit_scale=True, file=sys.stderr, dynamic_ncols=True, disable=not run.d.main)
    params = count_params(state.model)
    loss_fn = phase_loss(run, state)
    try:
        while pos["step_in_phase"] < n_steps:
            if final:  # the teacher grows along the stage (loaded only when it changes)
                loss_fn = phase_loss(run, state)
            rec, step_tokens = train_one_step(run, state, session, windows, params, loss_fn)
            if slice_due(run, state):  # before the checkpoint below, so a resume never repeats or skips it
                sync_back(session, state.model, state.optimizer)
                # DDP's reducer holds every parameter's grad accumulator, which keeps its pre-cut shape: release it
                session = None
                prune_slice(run, state)
                session = start_session(state.model, state.optimizer, run.d, shard_optimizer(cfg))
                session.module.train()
                params = count_params(state.model)
            bar.update(step_tokens)
            terms = {k: f"{rec[k]:.3f}" for k in ("kl", "layer", "ce") if k in rec}
            bar.set_postfix(loss=f"{rec['loss']:.3f}", **terms, lr=f"{rec['lr']:.2e}",
                            tok_s=f"{rec['tokens_per_s']:,.0f}", params=f"{params / 1e6:.2f}M")
            every = cfg.checkpoint_every
            if every and pos["global_step"] % every == 0 and pos["step_in_phase"] < n_steps:
                sync_back(session, state.model, state.optimizer)
                save_checkpoint(run, state)
            if on_step is not None:
                on_step(rec)
    finally:
        bar.close()
    sync_back(session, state.model, state.optimizer)
    return n_steps


def phase_teacher(state: AccelState) -> dict | None:
    """The report's record of this phase's teacher: its snapshot name and parameter count (None without one)."""
    name = state.distill["teacher"]
    if name is None:
        return None
    params = next((s["params"] for s in state.distill["snapshots"] if s["name"] == name), None)
    return {"name": name, "params": params}


def evaluate(run: AccelRun, state: AccelState, n_steps: int) -> None:
    """Held-out perplexity after the phase; records the phase and moves the position to the next one."""
    cfg, pos = run.cfg, state.position
    i = pos["phase"]
    ppl = heldout_ppl(run, state.model) if cfg.val_tokens else None
    phase_rec = {"phase": i, "params": count_params(state.model), "target": run.targets[min(i, cfg.phases - 1)],
                 "steps": n_steps, "tokens": int(run.plan.phase(i).shape[0] * cfg.seq_len),
                 "tokens_total": pos["tokens"], "ppl": ppl, "widths": layer_widths(state.model),
                 "teacher": phase_teacher(state)}
    if i >= cfg.phases:  # the final stage: every snapshot in turn
        phase_rec["teacher"]["sequence"] = [s["name"] for s in final_teachers(state)]
    state.summary["phases"].append(phase_rec)
    run.metrics.write({"event": "eval", **{k: v for k, v in phase_rec.items() if k != "widths"},
                       "global_step": pos["global_step"]})
    label = ("final distillation" if i >= cfg.phases else "training" if cfg.prune_every
             else f"phase {i + 1}/{cfg.interleaves}")
    log(run, f"{label}: {phase_rec['params']:,} params, {n_steps} steps, held-out ppl "
        f"{ppl if ppl is not None else float('nan'):.3f}")
    pos.update(phase=i + 1, pruned=False, step_in_phase=0)


# ---------------------------------------------------------------------------------------------------------
# finish
# ---------------------------------------------------------------------------------------------------------


def build_report(run: AccelRun, state: AccelState) -> RunReport:
    """The final report: parameters, per-layer widths, tokens used, held-out perplexity after every phase."""
    cfg, summary = run.cfg, state.summary
    phases = summary["phases"]
    return RunReport(
        command="accel", model=cfg.loading.model_name, settings=flat_dict(cfg),
        params_before=summary["params_initial"], params_after=count_params(state.model),
        target_params=run.targets[-1], widths_before=summary["widths_initial"],
        widths_after=layer_widths(state.model), ppl_before=summary["ppl_initial"],
        ppl_after=phases[-1]["ppl"] if phases else None, wall_seconds=time.perf_counter() - run.t_start,
        peak_rss_mb=peak_memory_mb(cfg.device),
        details={"optimizer_steps": run.total_steps, "tokens_used": state.position["tokens"], "phases": phases,
                 "prune_history": state.pruner.history, "hidden_size_before": state.pruner.original_hidden,
                 "hidden_size_after": DecoderAdapter(state.model).hidden_size,
                 # --prune-every: every slice (step, parameters after, groups and parameters removed per type)
                 **({"slices": summary.get("slices", [])} if cfg.prune_every else {})},
    )


def _write_run_files(run: AccelRun, out: Path) -> None:
    atomic_write(out / "metrics.jsonl", run.metrics.text())
    plot_progress(run.metrics.records, out / "accel_progress.png")


def remove_run_folders(run: AccelRun) -> None:
    """Delete what this run wrote in its checkpoint folder (checkpoints, metrics log), and the folder if empty."""
    checkpoint.remove_checkpoint_dir(run.ckpt_dir)
    if run.snapshots is not None:
        run.snapshots.remove()
    (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    checkpoint.remove_checkpoint_dir(run.run_dir)


def finish(run: AccelRun, state: AccelState) -> AccelResult:
    """Save the model and report (the end `prune` has too), then remove the checkpoints unless kept."""
    report = build_report(run, state)
    if run.teacher is not None:
        run.teacher.release()  # before the end-of-run bench loads the dense model
    if run.d.main:
        finish_run(report, state.model, run.tokenizer, run.cfg.output, dense=run.cfg.loading,
                   bench=not run.cfg.no_bench, extra=lambda out: _write_run_files(run, out),
                   standard=run.cfg.uniform_shape)
        if not run.cfg.keep_checkpoints:
            remove_run_folders(run)
    run.d.barrier()
    return AccelResult(state.model, run.tokenizer, report.to_dict())


def run(cfg: AccelConfig, on_step: Callable[[dict], None] | None = None) -> AccelResult:
    """Adapt-Accel end to end. ``on_step`` is called with each step's metrics after every optimizer step."""
    cfg.validate()
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = setup_distributed(cfg.device)
    try:
        accel_run, state = prepare(cfg, d, t_start)
        while state.position["phase"] < accel_run.stages:
            if not state.position["pruned"]:
                if cfg.prune_every:
                    begin_slices(accel_run, state)
                elif state.position["phase"] < cfg.interleaves:
                    prune_phase(accel_run, state)
                else:
                    begin_final_stage(accel_run, state)
            n_steps = train_phase(accel_run, state, on_step)
            evaluate(accel_run, state, n_steps)
            if state.position["phase"] < accel_run.stages:
                take_snapshot(accel_run, state)
                save_checkpoint(accel_run, state)
        return finish(accel_run, state)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def run_accel(cfg: AccelConfig) -> int:
    """Entry point of `adapt-engine accel`; returns the process exit code."""
    run(cfg)
    return 0
