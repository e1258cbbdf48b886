"""What the train loop asks of a recipe: an `Engine` wrapping model + optimizer + schedule.

The loop, for each optimizer step:  forward -> backward (x accum) -> step.  A recipe changes how
gradients are reduced, where state lives and how it is saved; never the order of the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallel.config import RunConfig


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; not biases or norm weights (the usual GPT split)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    # foreach=False: the same per-tensor arithmetic on every recipe (flat DeepSpeed partitions included).
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             foreach=False)


def lr_lambda(cfg: RunConfig):
    o, total = cfg.optim, cfg.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_scheduler(optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t   # a DTensor's shard on this rank


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, sharded: bool) -> torch.Tensor:
    """Global L2 norm of all gradients; scale them down to max_norm when above it (max_norm > 0).

    Sharded (FSDP): each rank holds a disjoint shard, so the squares are summed across ranks first.
    Replicated (single, DDP): every rank holds the full reduced gradient, no communication needed.
    """
    grads = [_local(p.grad) for p in params if p.grad is not None]
    sq = torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum() if grads else torch.zeros((),
                                                                                                      dtype=torch.float64)
    if sharded and dist.is_initialized():
        dist.all_reduce(sq)
    norm = sq.sqrt()
    if max_norm > 0 and torch.isfinite(norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm


class Engine:
    """The torch recipes' engine (single, ddp, fsdp): AdamW + LambdaLR + explicit global-norm clipping."""

    sharded = False

    def __init__(self, module: nn.Module, raw: nn.Module, cfg: RunConfig, ctx: Context):
        self.module, self.raw, self.cfg, self.ctx = module, raw, cfg, ctx
        self.optimizer = make_optimizer(module, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.module(x, y)

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        (loss / accum).backward()

    def step(self) -> tuple[float, bool]:
        """Clip, then step unless the gradient is NaN/Inf. Returns (grad norm before clipping, applied)."""
        params = list(self.module.parameters())
        norm = clip_grad_norm(params, self.cfg.optim.grad_clip, self.sharded)
        applied = bool(torch.isfinite(norm))
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)   # keep grad buffers (DDP bucket views) allocated
        return float(norm), applied

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Parameters, gradients and optimizer state this rank holds (shards only, for sharded recipes)."""
        params = [_local(p) for p in self.module.parameters()]
        grads = [_local(p.grad) for p in self.module.parameters() if p.grad is not None]
        state = [_local(t) for s in self.optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.ndim > 0]
        return {"params": params, "grads": grads, "optimizer": state}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict, unsharded, on CPU (collective for sharded recipes)."""
        return {k: v.detach().cpu().clone() for k, v in self.raw.state_dict().items()}

    def save(self, path: Path) -> None:
        """Write this rank's part of a checkpoint into directory `path` (replicated: rank 0 writes all)."""
        if self.ctx.is_main:
            torch.save({"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, path / "state.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / "state.pt", map_location=self.ctx.device, weights_only=True)
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
