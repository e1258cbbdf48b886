"""`ddp`: replicate the model, average gradients over the data-parallel ranks. gloo on CPU, nccl on GPU.

`parallelize` (parallel/primitives/parallelize.py) lays the model out first: tensor parallelism, context parallelism,
then DistributedDataParallel, or, where tensor parallelism made the parameters DTensors (which DDP does
not take), a by-hand average of the local gradient shards over the ranks with this rank's tp coordinate
(dp_replicate, x cp under context parallelism), once per step at the last micro-batch.

Micro-batching: `no_sync` on all micro-batches but the last (forward and backward), so gradients are
reduced once per step. A comm hook counts the bytes handed to all-reduce (summary.json).

Context parallelism (`cp.degree = C > 1`, dp_replicate x cp): each rank of a cp group takes its positions'
slice of the micro-batch's tokens and targets (parallel/primitives/context_parallel.py) and attends through ring
attention over the group. Its loss is the mean over its T/C tokens, so the loop's mean over all ranks is
`single`'s loss; the average over every rank (dp x cp), the sum over the cp group of each rank's gradient
of its mean / C, is the gradient of the whole sequence's mean.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from gpu_workbench.parallel.primitives.comm import CommCounter, comm_summary
from gpu_workbench.parallel.primitives.parallelize import Layout, parallelize
from gpu_workbench.parallel.recipes import loss_scale
from gpu_workbench.parallel.recipes.base import Context, Engine, Recipe, local
from gpu_workbench.parallel.recipes.parallel_engine import ParallelEngine
from gpu_workbench.parallel.runtime import compat, memory
from gpu_workbench.profiling import range as prange
from gpu_workbench.profiling import timeline


def _counting_allreduce(counter: CommCounter, bucket):
    """DDP's own all-reduce (average), after counting the bucket's bytes."""
    counter.add(bucket.buffer())
    # the launch; the reduction completes later, inside backward: with the timeline on,
    # parallel/primitives/comm_spans.py records the "allreduce" itself, from this issue to its completion, on the
    # "comm" lane
    with prange("allreduce.issue", bucket=bucket.index()):
        return default_hooks.allreduce_hook(None, bucket)


class DDPEngine(ParallelEngine):
    """Replicated parameters: DDP's bucketed all-reduce, or the by-hand average over DTensor parameters."""

    comm: CommCounter
    wrapped: bool               # DistributedDataParallel reduces (plain parameters), else the by-hand average
    micro_batches_seen: int     # DDP decides in forward whether the coming backward reduces

    def __init__(self, layout: Layout, cfg, ctx: Context):
        super().__init__(layout, cfg, ctx)
        self.comm, self.micro_batches_seen = layout.comm, 0
        self.wrapped = isinstance(layout.module, DistributedDataParallel)
        if self.wrapped:
            layout.module.register_comm_hook(self.comm, _counting_allreduce)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.wrapped:
            return self.loss(x, y)
        # no_sync must cover the forward too (around the backward alone it is ignored and every micro-batch
        # is reduced)
        accum = self.cfg.accum_steps(self.ctx.dims.dp)   # micro-batches per step: per data-parallel rank
        last = self.micro_batches_seen % accum == accum - 1
        self.micro_batches_seen += 1
        with contextlib.nullcontext() if last else self.module.no_sync():
            return self.loss(x, y)

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        super().backward(loss, accum, last)
        if last and self.layout.grad_group_size > 1:
            self._average_gradients()

    def _backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        with contextlib.nullcontext() if last or not self.wrapped else self.module.no_sync():
            loss_scale.scaled(self.scaler, loss / accum).backward()
        if last and self.wrapped and timeline.enabled():
            self._record_reduction_wait()

    def _average_gradients(self) -> None:
        """The by-hand average: one all-reduce of the flattened local gradient shards over the layout's group."""
        group, name, size = self.layout.grad_group, self.layout.grad_group_name, self.layout.grad_group_size
        experts = {id(p) for p in self.layout.experts.params} if self.layout.experts else set()
        grads = [local(p.grad) for p in self.module.parameters() if p.grad is not None and id(p) not in experts]
        flat = compat.flatten(grads)
        self.comm.add(flat)
        with prange("allreduce", group=name):
            dist.all_reduce(flat, group=group)
        flat /= size
        for g, reduced in zip(grads, compat.unflatten(flat, grads), strict=True):
            g.copy_(reduced)

    def _record_reduction_wait(self) -> None:
        """DDP waits for its buckets' all-reduces at the end of backward, inside torch: from the last bucket's
        issue to backward's return the rank computed (almost) nothing, so that is an `allreduce.wait` span
        (profiling/analyze.py counts it as exposed communication)."""
        issued = self.comm.last_add_ns
        if issued is not None:
            timeline.record("allreduce.wait", issued, time.perf_counter_ns())

    def summary_parts(self, run_dir, steps: int, elapsed_s: float) -> dict:
        """Gradient bytes all ranks moved through all-reduce (each rank sends its payload and receives the
        reduced one: 2 x payload x world size, comm.py's ruler), per step and sample; then tp and cp parts."""
        total = 2 * self.comm.bytes * self.ctx.world_size
        comm = comm_summary(total, steps, steps * self.cfg.global_batch, elapsed_s, self.comm.ops)
        return {"comm": comm, **super().summary_parts(run_dir, steps, elapsed_s)}


class DDP(Recipe):
    freezes = True
    quant_aware = None   # QATLinear inside the model (parallel/models/qat.py)
    data_parallel = "replicate"
    tensor_parallel = None   # dp_replicate x tp (parallel/primitives/tensor_parallel.py)
    context_parallel = None  # dp_replicate x cp (x tp) (parallel/primitives/context_parallel.py)
    expert_parallel = None   # experts over ep.degree of the dp ranks (parallel/primitives/expert_parallel.py)

    def memory_model(self, cfg):
        if cfg.tp.degree > 1:
            from gpu_workbench.parallel.primitives import tensor_parallel

            return tensor_parallel.memory_model("none")
        return memory.torch_adamw("none")

    def setup(self, model: nn.Module, cfg, ctx: Context) -> Engine:
        return DDPEngine(parallelize(model, cfg, ctx, "ddp"), cfg, ctx)
