"""Adapt-Accel under torchrun: this process's rank, the DDP or FSDP2 wrapper of each training phase, and the
checks that keep every rank pruning identically."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .adapters import DecoderAdapter


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


def start_session(model, optimizer, d: Dist, shard_optimizer: Callable[[nn.Module], Any] | None = None) -> Session:
    """Wrap the (possibly just pruned) model for this phase's training: DDP, or FSDP2 when ``shard_optimizer``
    (which builds the optimizer of the sharded copy) is given."""
    if d.world == 1:
        return Session(model, optimizer)
    if shard_optimizer is not None:
        return _start_fsdp(model, optimizer, d, shard_optimizer)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    # Buffers are RoPE constants, identical on every rank: no per-forward broadcast needed.
    try:
        return Session(DDP(model, device_ids=ids, forward_sync_buffers=False), optimizer)
    except TypeError:  # torch < 2.13 spells it broadcast_buffers
        return Session(DDP(model, device_ids=ids, broadcast_buffers=False), optimizer)


def _start_fsdp(model, optimizer, d: Dist, shard_optimizer: Callable[[nn.Module], Any]) -> Session:
    """FSDP2: shard a copy of the plain model (each decoder layer, then the root) and its AdamW state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh(d.device.type, (d.world,))
    shard = copy.deepcopy(model)
    for layer in shard.model.layers:
        fully_shard(layer, mesh=mesh)
    # The root (embedding, final norm, LM head) stays gathered from forward to backward, so the fused loss, which
    # reads the head after the forward (accel.train_one_step), gets the whole weight and gives it its gradient.
    fully_shard(shard, mesh=mesh, reshard_after_forward=False)
    shard_opt = shard_optimizer(shard)
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
    mine = [asdict(s) for s in DecoderAdapter(model).shapes()]
    everyone: list = [None] * d.world
    dist.all_gather_object(everyone, mine)
    if any(w != mine for w in everyone):
        raise RuntimeError("ranks pruned to different widths; the group scores were not identical across ranks "
                           "(please report this with the command line)")



def process_group_world() -> int:
    """Ranks in the default process group (torchrun), or 0 when none is initialized (a single process)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0


def rank_share(n: int, rank: int, world: int) -> range:
    """Which of a step's ``n`` sequences this rank processes: a contiguous block, so with the same
    --micro-batch every micro-batch holds exactly the sequences it holds in a single-process run."""
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def calibration_share(calib: torch.Tensor, batch_size: int, d: Dist) -> torch.Tensor:
    """This rank's calibration windows: whole batches, round-robin, so the ranks' summed scores equal one process's.
    With fewer batches than ranks every rank scores all of them (the sums scale, the ranking does not)."""
    batches = list(torch.split(calib, batch_size))
    return torch.cat(batches[d.rank::d.world]) if len(batches) >= d.world else calib
