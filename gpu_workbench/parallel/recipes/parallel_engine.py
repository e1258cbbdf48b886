"""The engine of a model that `parallelize` laid out (parallel/primitives/parallelize.py): what tensor and context
parallelism change in a step, whatever the data-parallel strategy. One subclass per strategy adds its own
gradient reduction: `DDPEngine` (recipes/ddp.py), `FSDPEngine` (recipes/fsdp.py); no class per combination.

- context parallelism: each micro-batch's tokens and targets are cut to this rank's positions, and the
  model gets those positions (the loss is the mean over them); one step's ring traffic is measured.
- tensor parallelism: forward and backward under loss_parallel (the head's logits are vocabulary-sharded),
  a sequence-parallel norm's Partial gradient reduced once per step, the clipping norm counts each element
  once over every rank (tensor_parallel.global_grad_norm), one step's TP collectives measured.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from gpu_workbench.parallel.primitives import context_parallel, expert_parallel, moe_summary, tensor_parallel
from gpu_workbench.parallel.primitives.parallelize import Layout
from gpu_workbench.parallel.recipes import loss_scale
from gpu_workbench.parallel.recipes.base import Context, TorchEngine, clip_, local
from gpu_workbench.profiling import range as prange


class ParallelEngine(TorchEngine):
    """AdamW over a parallelized model; subclasses reduce gradients their way in `_backward`."""

    layout: Layout
    tp_watch: tensor_parallel.CollectiveWatch | None
    cp_measured: dict | None   # one training step's ring traffic (the second step: the first may differ)

    def __init__(self, layout: Layout, cfg, ctx: Context):
        super().__init__(layout.module, layout.model, cfg, ctx)
        self.layout, self.sharded = layout, layout.sharded
        self.scaler = loss_scale.make(cfg, ctx.device, self.sharded)   # again: sharded is known now
        self.tp_watch = tensor_parallel.CollectiveWatch(cfg.steps, not cfg.train.compile) if layout.tp else None
        self.cp_measured = None

    # ---- forward and backward ----------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(x, y)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of this rank's tokens of the micro-batch (its cp positions, under context parallelism)."""
        p, shard = self.layout.positions, context_parallel.shard_sequence
        args = (x, y) if p is None else (shard(x, p), shard(y, p), p)
        if not self.layout.tp:
            return self.module(*args)
        with loss_parallel(), prange("tp.forward"):
            loss = self.module(*args)
        return loss.to_local() if isinstance(loss, DTensor) else loss   # Replicate: the same scalar on every rank

    def eval_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(x, y)

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        if not self.layout.tp:
            self._backward(loss, accum, last)
        else:
            with loss_parallel(), prange("tp.backward"):   # loss_parallel's backward needs it too
                self._backward(loss, accum, last)
            if last:
                tensor_parallel.reduce_partial_grads(self.module)
        if last and self.layout.experts is not None:
            expert_parallel.reduce_grads(self.layout.experts)

    def _backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        loss_scale.scaled(self.scaler, loss / accum).backward()

    # ---- the update --------------------------------------------------------------------------
    def step(self) -> tuple[float, bool]:
        if not self.layout.tp and self.layout.experts is None:
            return super().step()
        # tp's shards and ep's experts: each element counted once over the world
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        with prange("tp.grad_norm"):
            norm = tensor_parallel.global_grad_norm(grads, self.ctx.world_size)
        clip_([local(g) for g in grads], norm, self.cfg.optim.grad_clip)
        return self._update(norm)

    def _update(self, norm: torch.Tensor) -> tuple[float, bool]:
        out = super()._update(norm)
        if self.layout.tp:
            # None, not zeros: a sequence-parallel norm's next gradient arrives Partial, and adding a Partial
            # into a zeroed Replicate gradient would all-reduce on every micro-batch
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def train_step(self, dataset, step: int, dp_rank: int, dp: int, on_backward=None):
        stats = self.layout.cp_stats
        measure = stats is not None and self.cp_measured is None and step >= (1 if self.cfg.steps > 1 else 0)
        before = stats.to_dict() if measure else None
        ep = self.layout.experts   # expert parallelism: one training step's all-to-all bytes, as cp's
        ep_measure = ep is not None and ep.measured is None and (step >= 1 or self.cfg.steps == 1)
        ep_sent = ep.sent_bytes if ep_measure else None
        watch = self.tp_watch.step(step) if self.tp_watch else contextlib.nullcontext()
        with watch:
            out = super().train_step(dataset, step, dp_rank, dp, on_backward)
        if measure:
            self.cp_measured = context_parallel.step_traffic(before, stats.to_dict())
        if ep_sent is not None:
            ep.measured = ep.sent_bytes - ep_sent
        return out

    # ---- what the run reports ----------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in self.raw.state_dict().items():
            v = v.full_tensor() if isinstance(v, DTensor) else v   # all-gather: collective
            out[k] = v.detach().cpu().clone()
        return out

    def writes_state(self) -> bool:
        """Expert parallelism: the first ep group's replicas write too, each holding its experts (the copies
        of replicated tensors they also hold are written once: DCP's plan keeps one of equal items)."""
        dims = self.ctx.dims
        return super().writes_state() or (self.layout.experts is not None
                                           and dims.coords(self.ctx.rank)["dp_replicate"] < dims.ep)

    def params_on_rank(self, n_params: int) -> int:
        held = n_params
        if self.layout.tp:
            held = tensor_parallel.params_per_rank(self.cfg.model, n_params, self.cfg.tp.degree)
        if self.layout.experts is not None and not self.layout.sharded:
            # ddp: each rank holds 1/ep of the experts (whole over tp); fsdp shards them over all dp ranks (ep x
            # the rest), as the formula's parameters / dp says
            whole = sum(p.numel() for p in self.layout.experts.params)
            held += whole // self.ctx.dims.ep - whole
        return held

    def summary_parts(self, run_dir, steps: int, elapsed_s: float) -> dict:
        """The `tp` and `cp` parts, for the dimensions this layout has. Collective."""
        parts = {}
        if self.layout.tp:
            mbs = self.cfg.accum_steps(self.ctx.dims.dp)
            parts["tp"] = tensor_parallel.tp_stats(self.cfg, self.tp_watch.measured,
                                                   [tensor_parallel.predicted_step_bytes(self.cfg, mbs)])
        if self.layout.cp_stats is not None:
            parts["cp"] = context_parallel.cp_summary(self.cfg, self.ctx.dims, self.cp_measured)
        parts["moe"] = moe_summary.part(self.raw, self.cfg, self.ctx.dims, self.layout.experts)
        return parts
