"""Process-group plumbing for the shared loop: start the group, end a worker, collectives on Python objects."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpu_workbench.parallel.runtime import faults
from gpu_workbench.parallel.runtime.dims import ParallelDims
from gpu_workbench.parallel.runtime.errors import UserError


@dataclass  # this rank's place: what every recipe and the loop are handed
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dims: ParallelDims | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg, needs_group: bool = True) -> Context:
    """The process group torchrun's environment describes (gloo on CPU, nccl on GPU), or a one-process
    group, so DDP / DeepSpeed / FSDP also run alone. A recipe that needs none (`single`) runs without."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device = 'cuda' but no CUDA device is visible")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if needs_group and not dist.is_initialized():
        if world > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo", **faults.restart_safe_store())
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Context(rank=rank, world_size=world, local_rank=local_rank, device=device)


def exit_worker(code: int = 0) -> None:
    """End a torchrun worker process once its work is done, skipping interpreter teardown.

    At interpreter exit gloo's threads are torn down in no particular order and abort the process
    now and then ("terminate called without an active exception", exit -6), failing a finished job.
    After a barrier (no rank leaves while another still talks to it) the process ends at once.
    """
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().double().cpu()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)
