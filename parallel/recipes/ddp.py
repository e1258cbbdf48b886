"""`ddp`: replicate the model, all-reduce (average) gradients in backward. gloo on CPU, nccl on GPU.

Micro-batching: `no_sync` on all micro-batches but the last, so gradients are reduced once per step.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from parallel.config import RunConfig
from parallel.recipes.base import Context, Engine


class DDPEngine(Engine):
    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        sync = contextlib.nullcontext() if last else self.module.no_sync()
        with sync:
            (loss / accum).backward()


def setup(model: nn.Module, cfg: RunConfig, ctx: Context) -> Engine:
    model.to(ctx.device)
    # gradient_as_bucket_view: .grad are views into the reduction buckets, so a rank holds one copy
    # of the gradients (4 bytes/param), as the ZeRO formula for plain data parallelism assumes.
    ddp = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
              gradient_as_bucket_view=True)
    return DDPEngine(ddp, model, cfg, ctx)
