"""`pipeline`: pipeline parallelism on torch.distributed.pipelining, optionally x data x tensor parallelism.

Ranks form a (pp, dp, tp) mesh (parallel/runtime/dims.py, tp fastest): with tp = 1, rank r is stage-rank r // dp
of data-parallel replica r % dp; with tp.degree > 1 every stage is tensor-parallel over its tp group and
talks to the peer stage-ranks of its own (dp, tp) coordinate; the activations sent between stages are
plain tensors, replicated over tp (sequence parallelism: this rank's S/T positions)
(docs/ARCHITECTURE.md, Tensor parallelism). The GPT's blocks are cut into pp x v contiguous virtual
stages (balanced by parameter count, the embedding counted on the first stage and norm + head on the
last, or `pp.layers_per_stage`); stage s lives on stage-rank s % pp. Schedules: gpipe, 1f1b (one stage
per rank), interleaved-1f1b and zero-bubble (v = pp.virtual_stages stages per rank; zero-bubble splits
each backward into input and weight parts).

One optimizer step:
  1. the replica's global_batch / dp samples go through the schedule in m = pp.microbatches micro-batches
     (mean loss per micro-batch; the schedule divides the gradients by m: the train loop's accumulation)
  2. gradients all-reduced (averaged) across the dp replicas, once, in one flat buffer
  3. a tied embedding lives on the first and the last stage: their two gradients are summed (under TP,
     the local vocabulary shards of the same tp coordinate)
  4. global-norm clipping: squares summed over the stages and TP shards (the tied copy counted once), then AdamW
Loss: the last stage's, broadcast to its replica's stages, so the loop's mean over ranks is right.
Checkpoints: the universal format (parallel/checkpoint/universal.py), written by replica 0's stages.
Bubble: see summary_fields().
"""

from __future__ import annotations

import atexit
import contextlib
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from gpu_workbench.parallel import models
from gpu_workbench.parallel.data import rank_slice
from gpu_workbench.parallel.models.transformer import GPT, cross_entropy
from gpu_workbench.parallel.primitives import tensor_parallel
from gpu_workbench.parallel.primitives.compilation import compile_blocks
from gpu_workbench.parallel.primitives.pipeline.bubble import measure
from gpu_workbench.parallel.primitives.pipeline.gantt import draw_gantt
from gpu_workbench.parallel.primitives.pipeline.schedule import Op, closed_form_bubble, peak_inflight, simulate
from gpu_workbench.parallel.primitives.pipeline.stages import (
    GPTView,
    SpanRecorder,
    StageModule,
    TimedStage,
    _active,
    instrument_p2p,
    stage_sizes,
)
from gpu_workbench.parallel.primitives.tensor_parallel import (
    CollectiveWatch,
    global_grad_norm,
    predicted_step_bytes,
    stage_params_per_rank,
    tp_stats,
)
from gpu_workbench.parallel.recipes import loss_scale
from gpu_workbench.parallel.recipes.base import (
    Context,
    Engine,
    Recipe,
    StepResult,
    TorchEngine,
    clip_,
    grad_norm,
    local,
)
from gpu_workbench.parallel.runtime import compat, memory
from gpu_workbench.parallel.runtime.dims import ParallelDims
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.summary import PipelineStats, TensorParallelStats
from gpu_workbench.profiling import range as prange
from gpu_workbench.profiling.timeline import clock_offset_ns

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B,
             "zero-bubble": ScheduleInterleavedZeroBubble}
KEEP_STEPS = 20   # the last steps whose spans are kept for the bubble measurement


class PipelineEngine(TorchEngine):
    def __init__(self, stages: list[StageModule], cfg, ctx: Context, mesh):
        """`mesh`: the (pp, dp_replicate, tp) DeviceMesh; the stages are already tensor-parallel on its tp dim."""
        module = nn.ModuleList(stages)
        super().__init__(module, module, cfg, ctx)
        dims, coords = ctx.dims, ctx.dims.coords(ctx.rank)
        self.pp, self.dp, self.tp, self.v = dims.pp, dims.dp, dims.tp, cfg.pp.virtual_stages
        self.pp_rank, self.dp_rank, self.tp_rank = coords["pp"], dims.dp_rank(ctx.rank), coords["tp"]
        # each rank's pp group holds the stage-ranks of its own (dp, tp) coordinate: its p2p peers
        self.pp_group, self.dp_group = mesh.get_group("pp"), mesh.get_group("dp_replicate")
        # A tied embedding: first stage (stage-rank 0) and head (stage-rank pp-1) hold a copy each.
        self.tied = cfg.model.tie_embeddings and self.pp > 1
        self.tie_group = _tie_group(mesh, ctx.rank) if self.tied else None
        self.stages = stages
        self.tp_watch = CollectiveWatch(cfg.steps, not cfg.train.compile) if self.tp > 1 else None
        sync = torch.cuda.synchronize if ctx.device.type == "cuda" else None   # spans cover their kernels
        self.recorder = SpanRecorder(clock_offset_ns(), sync=sync)
        self.history: list[list[tuple]] = []
        instrument_p2p(cfg.fault.collective_timeout_s)
        n_stages = self.pp * self.v
        pipe = [TimedStage(mod, self.pp_rank + k * self.pp, n_stages, ctx.device, group=self.pp_group,
                           recorder=self.recorder) for k, mod in enumerate(stages)]
        cls = SCHEDULES[cfg.pp.schedule]
        loss_fn = cross_entropy
        self.schedule = (cls(pipe[0], cfg.pp.microbatches, loss_fn=loss_fn) if cfg.pp.schedule in ("gpipe", "1f1b")
                         else cls(pipe, cfg.pp.microbatches, loss_fn=loss_fn))
        self.has_first = any(s.is_first for s in stages)
        self.has_last = any(s.is_last for s in stages)
        self.last_rank = dist.get_global_rank(self.pp_group, self.pp - 1)

    # ---- one optimizer step ------------------------------------------------------------------
    def train_step(self, dataset, step: int, dp_rank: int, dp: int, on_backward=None):
        losses: list[torch.Tensor] = []
        args, kwargs = self._schedule_inputs(dataset, step, dp_rank, dp, losses, split="train")
        # TP: the last stage's logits are vocabulary-sharded; the schedule computes the loss and runs its
        # backward inside step(), so loss_parallel() spans the whole step (docs/ARCHITECTURE.md, Tensor parallelism)
        watch = self.tp_watch.step(step) if self.tp_watch else contextlib.nullcontext()   # TP collectives
        _active.append(self.recorder)
        try:
            with watch, self._autocast(), self._vocab_parallel():
                self.schedule.step(*args, return_outputs=False, **kwargs)
                if self.tp > 1:   # before on_backward, which measures the gradients this rank holds
                    _place_grads_as_params(self.module)
        finally:
            _active.pop()
        self.history = [*self.history[-(KEEP_STEPS - 1):], self.recorder.take()]
        loss_sum = self._loss_sum(losses)
        if on_backward is not None:
            on_backward(0, 1)
        lr = self.lr
        with prange("optimizer", step=step):
            norm, applied = self.step()
        return StepResult(loss_sum, lr, norm, applied)

    def eval_loss(self, dataset, batch: int, dp_rank: int, dp: int) -> torch.Tensor:
        """The held-out batch through the schedule's forward-only pass (no spans recorded: not a step)."""
        losses: list[torch.Tensor] = []
        args, kwargs = self._schedule_inputs(dataset, batch, dp_rank, dp, losses, split="val")
        with torch.no_grad(), self._autocast(), self._vocab_parallel():
            self.schedule.eval(*args, return_outputs=False, **kwargs)
        return self._loss_sum(losses)

    def _schedule_inputs(self, dataset, step: int, dp_rank: int, dp: int, losses: list, split: str):
        """The schedule's (args, kwargs) for this rank's slice: tokens on the first stage, targets and the
        list the losses go into on the last."""
        rows = rank_slice(self.cfg.global_batch, dp_rank, dp)
        x, y = (t.to(self.ctx.device) for t in dataset.batch(step, rows, split=split))
        return ((x,) if self.has_first else ()), ({"target": y, "losses": losses} if self.has_last else {})

    def _autocast(self):
        return loss_scale.autocast(self.cfg, self.ctx.device.type)   # bf16 (fp16 is refused here)

    def _vocab_parallel(self):
        return loss_parallel() if self.tp > 1 else contextlib.nullcontext()

    def _loss_sum(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The sum of the last stage's micro-batch losses, broadcast to every stage-rank of this replica."""
        losses = [local(loss) for loss in losses]   # a Replicate DTensor under TP: the same scalar on every TP rank
        loss_sum = (torch.stack([loss.detach().double().cpu() for loss in losses]).sum() if losses
                    else torch.zeros((), dtype=torch.float64))
        dist.broadcast(loss_sum, src=self.last_rank, group=self.pp_group)   # the last stage's loss, to all
        return loss_sum

    def _own_params(self) -> list[nn.Parameter]:
        """This rank's parameters, a tied head copy left out (its first-stage twin is counted)."""
        skip = {id(s.head.weight) for s in self.stages if s.is_last and self.tied}
        return [p for p in self.module.parameters() if id(p) not in skip]

    def step(self) -> tuple[float, bool]:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.dp > 1:   # average over replicas, once per step, one flat buffer (the local TP shards)
            grads = [local(p.grad) for p in params]
            flat = compat.flatten(grads)
            with prange("allreduce", stage=self.pp_rank):
                dist.all_reduce(flat, group=self.dp_group)
            flat /= self.dp
            for g, reduced in zip(grads, compat.unflatten(flat, grads), strict=True):
                g.copy_(reduced)
        if self.tie_group is not None:
            stage = self.stages[0] if self.pp_rank == 0 else self.stages[-1]
            weight = stage.tok_emb.weight if self.pp_rank == 0 else stage.head.weight
            # both copies Shard(0) over the same tp coordinate: the local vocabulary rows line up
            dist.all_reduce(local(weight.grad), group=self.tie_group)
        own = [p.grad for p in self._own_params() if p.grad is not None]
        if self.tp > 1:   # over stages and TP shards: a replicated parameter once per stage, the tied copy once
            norm = global_grad_norm(own, self.ctx.world_size // self.pp)
        else:   # the stages hold disjoint parameters: squares summed over the pp group (the tied copy once)
            norm = grad_norm(own, self.pp_group, summed=True)
        clip_([local(p.grad) for p in params], norm, self.cfg.optim.grad_clip)
        out = self._update(norm)
        if self.tp > 1:   # as the TP engines: a Partial SP gradient must not be added into a zeroed Replicate one
            self.optimizer.zero_grad(set_to_none=True)
        return out

    # ---- state -------------------------------------------------------------------------------
    def state_module(self) -> nn.Module:
        """This rank's stages under the GPT's names (the universal checkpoint's keys)."""
        return GPTView(self.stages)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        # full_tensor(): a collective over the TP group, whose ranks hold the same stages' keys in the same order
        mine = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                for s in self.stages for k, v in s.state_dict().items()}
        everyone = [None] * self.ctx.world_size
        dist.all_gather_object(everyone, mine if self.dp_rank == 0 and self.tp_rank == 0 else {})
        return {k: v for part in everyone for k, v in part.items()}

    def _torch_orders(self) -> dict[int, list[tuple[str, int, int]]] | None:
        """The (kind, mb, stage) order per rank of torch's multi-stage schedules (None for gpipe / 1f1b)."""
        order = getattr(self.schedule, "pipeline_order", None)
        if self.cfg.pp.schedule in ("gpipe", "1f1b") or not order:
            return None
        kinds = {"F": "F", "B": "B", "I": "B", "W": "W"}
        return {r: [(kinds[str(a.computation_type.value)], a.microbatch_index, a.stage_index) for a in actions
                     if a is not None and str(a.computation_type.value) in kinds] for r, actions in order.items()}

    # ---- the bubble --------------------------------------------------------------------------
    def params_on_rank(self, n_params: int) -> int:
        """A stage-rank holds only its stages' parameters (plus the tied head copy); under TP, predicted
        from the shapes: Ψs/T + Ψr of each of its stages."""
        if self.tp == 1:
            return sum(p.numel() for p in self.module.parameters())
        return sum(stage_params_per_rank(self.cfg.model, len(s.blocks), s.is_first, s.is_last, self.tp)
                   for s in self.stages)

    def summary_parts(self, run_dir: Path, steps_run: int, elapsed_s: float) -> dict:
        """Measured vs predicted bubble (parallel.pipeline.bubble); writes <run_dir>/pipeline.json (the
        reported step's spans and the simulated ones) and gantt.png (pp.gantt). Predicted = the simulator
        run on torch's own action order with each stage's median measured forward / backward cost:
        unequal stages count, communication does not. Collective."""
        gathered = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, (self.pp_rank, self.dp_rank, self.history))
        if not self.ctx.is_main:
            return {}
        tp = {"tp": self._tp_stats()} if self.tp > 1 else {}
        cfg, pp, m, v = self.cfg, self.pp, self.cfg.pp.microbatches, self.v
        history = {(r, d): h for r, d, h in gathered}
        got = measure(history, cpu_costs=self.ctx.device.type == "cpu", n_stages=pp * v)
        costs = got["costs"]
        bwd = [b + w for b, w in zip(costs["B"], costs["W"], strict=True)]
        share = statistics.mean(w / t if t else 0.5 for w, t in zip(costs["W"], bwd, strict=True))
        sim = simulate(cfg.pp.schedule, pp, m, v, fwd=costs["F"], bwd=bwd, weight_share=share or 0.5,
                       orders=self._torch_orders())
        inflight = [max(peak_inflight([Op(*s[:5]) for s in step]) for step in history[r, 0]) for r in range(pp)]
        self._write_timeline(Path(run_dir), got, sim)
        return {"pipeline": PipelineStats(
            pp=pp, pp_schedule=cfg.pp.schedule, pp_microbatches=m, pp_virtual_stages=v,
            pp_layers_per_stage=self.sizes,
            bubble_fraction_measured=got["bubble"], bubble_fraction_measured_median=got["median"],
            bubble_fraction_measured_by_step=got["by_step"], cpu_stolen_fraction_by_step=got["stolen_by_step"],
            bubble_fraction_predicted=sim.bubble_fraction,
            bubble_fraction_closed_form=closed_form_bubble(cfg.pp.schedule, pp, m, v),
            stage_fwd_ms=costs["F"], stage_bwd_ms=bwd,
            peak_inflight_microbatches_measured=max(inflight), peak_inflight_microbatches_by_rank=inflight,
            peak_inflight_microbatches_predicted=max(sim.peak_inflight)), **tp}

    def _tp_stats(self) -> TensorParallelStats:
        """This rank's TP collectives of one step (measured) beside its stages' share of the TP prediction."""
        m = self.cfg.pp.microbatches   # measured: the schedule's p2p and the gradient sums are not DTensor's
        parts = [predicted_step_bytes(self.cfg, m, (len(s.blocks), s.is_first, s.is_last)) for s in self.stages]
        return tp_stats(self.cfg, self.tp_watch.measured, parts)

    def _write_timeline(self, run_dir: Path, got: dict, sim) -> None:
        """pipeline.json: the reported step's measured spans beside the simulated ones; gantt.png."""
        cfg = self.cfg
        origin = min(s[3] for spans in got["spans"].values() for s in spans)
        timeline = {
            "schedule": cfg.pp.schedule, "pp": self.pp, "dp": self.dp, "microbatches": cfg.pp.microbatches,
            "virtual_stages": self.v,
            "measured": {r: [[*s[:3], (s[3] - origin) / 1e6, (s[4] - origin) / 1e6] for s in spans]
                         for r, spans in sorted(got["spans"].items())},
            "predicted": {r: [[o.kind, o.mb, o.stage, o.start, o.end] for o in ops] for r, ops in sim.ops.items()},
            "bubble_fraction_measured": got["bubble"], "bubble_fraction_predicted": sim.bubble_fraction,
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "pipeline.json").write_text(json.dumps(timeline))
        if cfg.pp.gantt:
            draw_gantt(timeline, run_dir / "gantt.png")


def _tie_group(mesh, rank: int):
    """The group of this rank's tied-embedding pair: the first and the last stage-rank of the same dp and tp
    coordinates (taken from the mesh, not from rank arithmetic). Every rank creates every pair's group."""
    ranks, mine = mesh.mesh, None   # global ranks, shape (pp, dp_replicate, tp)
    for d in range(ranks.shape[1]):
        for t in range(ranks.shape[2]):
            pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
            group = dist.new_group(pair)
            if rank in pair:
                mine = group
    return mine


def _place_grads_as_params(module: nn.Module) -> None:
    """Each TP gradient laid out as its parameter. The vocabulary-parallel embedding's weight gradient comes
    out Replicate (every TP rank computes all rows); the tied first/last-stage sum needs the Shard(0) rows
    that line up with the head copy's (Replicate -> Shard(0) is a local slice, no communication)."""
    for p in module.parameters():
        g = p.grad
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            with prange("tp.place_grads"):
                p.grad = g.redistribute(placements=p.placements)


def _destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Pipeline(Recipe):
    """pp stage-ranks x dp replicas: `pp.degree` (0 = every process a stage)."""

    data_parallel = "replicate"
    tensor_parallel = None   # composes: each stage tensor-parallel over its tp group (docs/ARCHITECTURE.md)
    # the routers' losses are summed in GPT.forward, which a stage never runs whole
    experts = "the pipeline's stages do not carry the routers' losses yet; use single, ddp or fsdp"

    def dims(self, cfg, world_size: int):
        super().dims(cfg, world_size)   # the world-size bounds
        # pp.degree 0: every rank that tp and cp leave is a stage
        pp = cfg.pp.degree or max(1, world_size // (cfg.tp.degree * cfg.cp.degree))
        return ParallelDims.for_world(world_size, "replicate", pp=pp,
                                      cp=cfg.cp.degree, tp=cfg.tp.degree)

    def memory_model(self, cfg) -> memory.MemoryModel:
        return memory.torch_adamw("none", psi="(Ψs/T+Ψr)_stage" if cfg.tp.degree > 1 else "Ψ_stage")

    def validate_layout(self, cfg, dims) -> None:
        check_pp_layout(cfg, dims.pp, dims.dp)

    def setup(self, model: GPT, cfg, ctx: Context) -> Engine:
        model.to(ctx.device)
        pp, v = ctx.dims.pp, cfg.pp.virtual_stages
        pp_rank = ctx.dims.coords(ctx.rank)["pp"]
        n_stages = pp * v
        sizes = stage_sizes(model, n_stages, cfg.pp.layers_per_stage)
        starts = [sum(sizes[:s]) for s in range(n_stages)]
        stages = [StageModule(model, starts[s], sizes[s], s == 0, s == n_stages - 1, untie=pp > 1)
                  for s in range(pp_rank, n_stages, pp)]
        mesh = ctx.dims.build_mesh(ctx.device.type, ("pp", "dp_replicate", "tp"))
        if ctx.dims.tp > 1:   # every stage tensor-parallel over its tp group (docs/ARCHITECTURE.md, Tensor parallelism)
            for stage in stages:
                tensor_parallel.apply(stage, mesh["tp"], cfg.tp.sequence_parallel, models.get(cfg.model.arch))
        for stage in stages:   # train.compile: step 4 of parallelize, on this rank's blocks
            compile_blocks(stage.blocks.values(), cfg)
        engine = PipelineEngine(stages, cfg, ctx, mesh)
        # gloo's p2p threads abort the process ("terminate called without an active exception") when the
        # interpreter tears the groups down unordered at exit (seen ~1 in 2 runs): destroy them first.
        atexit.unregister(_destroy_groups)
        atexit.register(_destroy_groups)
        engine.sizes = sizes
        return engine


def check_pp_layout(cfg, pp: int, dp: int) -> None:
    """stages (pp x v) <= layers; microbatches >= pp. Fixes micro_batch from pp.microbatches (or the reverse)."""
    v, m = cfg.pp.virtual_stages, cfg.pp.microbatches
    if cfg.pp.layers_per_stage and len(cfg.pp.layers_per_stage) != pp * v:
        raise UserError(f"pp.layers_per_stage has {len(cfg.pp.layers_per_stage)} entries, need pp.degree x "
                        f"pp.virtual_stages = {pp * v}")
    if cfg.model.n_layers < pp * v:
        raise UserError(f"model.n_layers ({cfg.model.n_layers}) must be >= pp.degree x pp.virtual_stages "
                        f"({pp * v}): every stage needs a block")
    if m == 0:   # the train loop's micro-batching: one pipeline micro-batch per accumulation step
        if cfg.global_batch % (cfg.micro_batch * dp):
            return   # RunConfig.check_layout names the problem
        m = cfg.pp.microbatches = cfg.global_batch // (cfg.micro_batch * dp)
    elif cfg.global_batch % (m * dp):
        raise UserError(f"global_batch ({cfg.global_batch}) must be divisible by pp.microbatches ({m}) x "
                        f"data-parallel degree ({dp})")
    else:
        cfg.micro_batch = cfg.global_batch // (m * dp)
    if m < pp:
        raise UserError(f"pp.microbatches ({m}) must be >= pp.degree ({pp}), or the pipeline never fills")
    if cfg.pp.schedule in ("interleaved-1f1b", "zero-bubble") and m % pp:
        raise UserError(f"pp.microbatches ({m}) must be a multiple of pp.degree ({pp}) for "
                        f"pp.schedule={cfg.pp.schedule}")
