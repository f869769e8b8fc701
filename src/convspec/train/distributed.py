"""torch.distributed plumbing for ``torchrun --nproc-per-node N -m convspec train ...``."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_main_thread(self) -> bool:
        return threading.current_thread() is threading.main_thread()


def setup() -> DistContext:
    """Join the process group that torchrun describes (``WORLD_SIZE`` > 1), else a single process.

    Backend: NCCL with one GPU per process when CUDA is available, gloo on the CPU otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        initialized_here = True
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, initialized_here)


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` when running distributed, else ``model``."""
    if ctx.world_size <= 1:
        return model
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Broadcast rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP does the same at the start of each forward, but after the last step of an epoch each rank
    holds the statistics of its own batch; syncing makes evaluation, checkpoints and the weights
    every rank ends with identical.
    """
    if ctx.world_size > 1:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def any_flags(ctx: DistContext, *flags: bool) -> tuple:
    """Each flag OR-ed over all ranks (one small all-reduce; local when not distributed)."""
    if ctx.world_size <= 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], device=ctx.device)
    dist.all_reduce(t)
    return tuple(bool(v > 0) for v in t.tolist())


def sum_over_ranks(ctx: DistContext, values: list) -> list:
    """``values`` summed over all ranks (float64), e.g. an epoch's loss and accuracy counts."""
    if ctx.world_size <= 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def cleanup(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
