"""`local-sgd` and `diloco`: each rank trains its own replica on its own data slice for H =
`local_sgd.sync_every` steps with no communication at all, then the replicas meet.

- local-sgd: the replicas' parameters are averaged (one all-reduce of the parameters every H steps,
  where ddp all-reduces the gradients every step: H x fewer bytes per sample).
- diloco (Douillard et al. 2023): the inner optimizer is the usual AdamW; every H steps the averaged
  pseudo-gradient  delta = global - mean(local)  feeds an outer SGD with Nesterov momentum
  (`local_sgd.outer_lr`, `local_sgd.outer_momentum`) on the global copy, which every replica then loads.

Runs under torchrun in the shared loop (gloo on CPU, nccl on GPU); the loop's loss is the mean over
ranks of each replica's own loss. Gradient clipping is per replica (its own gradient's norm).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from gpu_workbench.parallel.primitives.comm import CommCounter, comm_summary
from gpu_workbench.parallel.recipes.base import Context, Engine, Recipe, TorchEngine
from gpu_workbench.parallel.runtime.errors import UserError


class LocalSGDEngine(TorchEngine):
    def __init__(self, module: nn.Module, cfg, ctx: Context, diloco: bool):
        super().__init__(module, module, cfg, ctx)
        self.diloco = diloco
        self.comm = CommCounter()
        self.local_steps = 0
        self.syncs = 0
        self.params = [p for p in module.parameters() if p.requires_grad]
        if self.diloco:   # the global copy the outer optimizer owns, on every rank
            self.global_params = [p.detach().clone() for p in self.params]
            self.outer = torch.optim.SGD(self.global_params, lr=cfg.local_sgd.outer_lr,
                                         momentum=cfg.local_sgd.outer_momentum, nesterov=True)

    def step(self) -> tuple[float, bool]:
        norm, applied = super().step()   # the inner step: local clip + AdamW + schedule, no communication
        self.local_steps += 1
        if self.local_steps % self.cfg.local_sgd.sync_every == 0 or self.local_steps == self.cfg.steps:
            self.sync()
        return norm, applied

    def _average(self, tensors: list[torch.Tensor]) -> None:
        """In-place mean over ranks, as one flat all-reduce."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        self.comm.add(flat)
        if world > 1:
            dist.all_reduce(flat)
            flat /= world
        offset = 0
        for t in tensors:
            t.data.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    @torch.no_grad()
    def sync(self) -> None:
        self.syncs += 1
        if not self.diloco:
            self._average(self.params)
            return
        deltas = [g - p for g, p in zip(self.global_params, self.params, strict=True)]   # pseudo-gradients
        self._average(deltas)
        for g, d in zip(self.global_params, deltas, strict=True):
            g.grad = d
        self.outer.step()
        for p, g in zip(self.params, self.global_params, strict=True):
            p.copy_(g)

    def save(self, path, step: int, previous: dict | None = None):
        """Rank 0's replica (replicas are equal right after a sync; elsewhere a resume restarts every rank from
        rank 0's), plus the sync phase and, for diloco, the global copy and the outer momentum."""
        written = super().save(path, step, previous)
        if self.ctx.is_main:
            extra = {"local_steps": self.local_steps, "syncs": self.syncs}
            if self.diloco:
                extra.update(global_params=[g.detach().cpu() for g in self.global_params],
                             outer=self.outer.state_dict())
            torch.save(extra, path / "local_sgd.pt")
        return written

    @torch.no_grad()
    def load(self, path, model_only: bool = False) -> None:
        super().load(path, model_only)
        if model_only:   # a new run from another's weights: its own sync phase and outer optimizer
            return
        if not (path / "local_sgd.pt").is_file():
            raise UserError(f"checkpoint {path} holds no {self.cfg.recipe} state (its sync phase): it was "
                            f"written by another recipe; use checkpoint.load_model_only=true, or another run_dir")
        extra = torch.load(path / "local_sgd.pt", map_location=self.ctx.device, weights_only=True)
        self.local_steps, self.syncs = extra["local_steps"], extra["syncs"]
        if self.diloco:
            for g, saved in zip(self.global_params, extra["global_params"], strict=True):
                g.copy_(saved)
            self.outer.load_state_dict(extra["outer"])

    def summary_parts(self, run_dir, steps: int, elapsed_s: float) -> dict:
        # every rank sends its parameters (or pseudo-gradients) and receives the average: 2 x payload x ranks
        total = 2 * self.comm.bytes * self.ctx.world_size
        return {"comm": comm_summary(total, steps, steps * self.cfg.global_batch, elapsed_s, self.comm.ops,
                                     sync_every=self.cfg.local_sgd.sync_every, outer_syncs=self.syncs)}

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        held = super().held_tensors()
        if self.diloco:
            held["optimizer"] += self.global_params + [t for s in self.outer.state.values() for t in s.values()
                                                       if torch.is_tensor(t) and t.ndim > 0]
        return held


class LocalSGD(Recipe):
    data_parallel = "replicate"
    tensor_parallel = "its parameter averaging is not written for DTensor shards yet; use --recipe ddp"
    diloco = False

    def setup(self, model: nn.Module, cfg, ctx: Context) -> Engine:
        model.to(ctx.device)
        return LocalSGDEngine(model, cfg, ctx, diloco=self.diloco)


class DiLoCo(LocalSGD):
    diloco = True
