"""`ddp`: replicate the model, all-reduce (average) gradients in backward. gloo on CPU, nccl on GPU.

Micro-batching: `no_sync` on all micro-batches but the last (forward and backward), so gradients are
reduced once per step. A comm hook counts the bytes handed to all-reduce (summary.json).

Context parallelism (`cp.degree = C > 1`, dp_replicate x cp): each rank of a cp group takes its positions'
slice of the micro-batch's tokens and targets (parallel/context_parallel.py) and attends through ring
attention over the group. Its loss is the mean over its T/C tokens, so the loop's mean over all ranks is
`single`'s loss; DDP averages gradients over every rank (dp x cp), the sum over the cp group of each
rank's gradient of its mean / C being the gradient of the whole sequence's mean.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from gpu_workbench.parallel.comm import CommCounter, comm_summary
from gpu_workbench.parallel.context_parallel import CPEngineMixin, setup_rank
from gpu_workbench.parallel.recipes.base import Context, Engine, Recipe, TorchEngine
from gpu_workbench.profiling import range as prange
from gpu_workbench.profiling import timeline


def _counting_allreduce(counter: CommCounter, bucket):
    """DDP's own all-reduce (average), after counting the bucket's bytes."""
    counter.add(bucket.buffer())
    # the launch; the reduction completes later, inside backward: with the timeline on, parallel/comm_spans.py
    # records the "allreduce" itself, from this issue to its completion, on the "comm" lane
    with prange("allreduce.issue", bucket=bucket.index()):
        return default_hooks.allreduce_hook(None, bucket)


class DDPEngine(TorchEngine):
    def summary_parts(self, run_dir, steps: int, elapsed_s: float) -> dict:
        """Gradient bytes all ranks moved through all-reduce (the comm hook counts this rank's buckets; each
        rank sends its bucket and receives the reduced one: 2 x payload x world size), per step and sample."""
        c = self.comm
        total = 2 * c.bytes * self.ctx.world_size
        return {"comm": comm_summary(total, steps, steps * self.cfg.global_batch, elapsed_s, c.ops)}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # DDP decides in forward whether the coming backward all-reduces, so no_sync must cover the
        # forward too (around the backward alone it is ignored and every micro-batch is reduced).
        accum = self.cfg.accum_steps(self.ctx.dims.dp)   # micro-batches per step: per data-parallel rank
        last = self.micro_batches_seen % accum == accum - 1
        self.micro_batches_seen += 1
        with contextlib.nullcontext() if last else self.module.no_sync():
            return self.loss(x, y)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.module(x, y)

    def eval_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(x, y)   # not counted: forward above counts training micro-batches

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        sync = contextlib.nullcontext() if last else self.module.no_sync()
        with sync:
            (loss / accum).backward()
        if last and timeline.enabled():
            self._record_reduction_wait()

    def _record_reduction_wait(self) -> None:
        """DDP waits for its buckets' all-reduces at the end of backward, inside torch: from the last bucket's
        issue to backward's return the rank computed (almost) nothing, so that is an `allreduce.wait` span
        (profiling/analyze.py counts it as exposed communication)."""
        issued = self.comm.last_add_ns
        if issued is not None:
            timeline.record("allreduce.wait", issued, time.perf_counter_ns())


class DDPCPEngine(CPEngineMixin, DDPEngine):
    """ddp over dp_replicate x cp: this rank's positions of every sequence, ring attention over its cp group."""

    def __init__(self, module: nn.Module, raw: nn.Module, cfg, ctx: Context, positions: torch.Tensor, cp_stats):
        super().__init__(module, raw, cfg, ctx)
        self.positions = positions   # this rank's positions in every sequence (context_parallel.shard_positions)
        self.cp_stats = cp_stats     # ring attention's measured blocks and bytes (ContextParallelStats)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from gpu_workbench.parallel.context_parallel import shard_sequence

        p = self.positions
        return self.module(shard_sequence(x, p), shard_sequence(y, p), p)   # the mean over this rank's tokens

    def summary_parts(self, run_dir, steps: int, elapsed_s: float) -> dict:
        return {**super().summary_parts(run_dir, steps, elapsed_s), **self.cp_summary()}


class DDP(Recipe):
    freezes = True
    quant_aware = None   # QATLinear inside the model (parallel/qat.py)
    data_parallel = "replicate"
    tensor_parallel = None   # dp_replicate x tp (parallel/tensor_parallel.py)
    context_parallel = None  # dp_replicate x cp, and dp_replicate x cp x tp (parallel/context_parallel.py)

    def memory_model(self, cfg):
        if cfg.tp.degree > 1:
            from gpu_workbench.parallel import tensor_parallel

            return tensor_parallel.memory_model("none")
        return super().memory_model(cfg)

    def setup(self, model: nn.Module, cfg, ctx: Context) -> Engine:
        if cfg.tp.degree > 1:   # dp_replicate (x cp) x tp: DDP does not take DTensor parameters
            from gpu_workbench.parallel import tensor_parallel

            return tensor_parallel.setup_ddp(model, cfg, ctx)
        model.to(ctx.device)
        cp = setup_rank(model, cfg, ctx) if cfg.cp.degree > 1 else None
        # gradient_as_bucket_view: .grad are views into the reduction buckets, so a rank holds one copy
        # of the gradients (4 bytes/param), as the ZeRO formula for plain data parallelism assumes.
        ddp = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)
        engine = DDPEngine(ddp, model, cfg, ctx) if cp is None else DDPCPEngine(ddp, model, cfg, ctx, *cp)
        engine.comm, engine.micro_batches_seen = CommCounter(), 0
        ddp.register_comm_hook(engine.comm, _counting_allreduce)
        return engine
