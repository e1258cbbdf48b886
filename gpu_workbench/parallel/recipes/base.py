"""What a recipe is, and what the train loop asks of the engine a recipe builds.

A `Recipe` owns everything that differs between parallelisms: the world sizes it runs on, its config
checks, how it maps onto the parallel dimensions, its memory model, how its workers run (`execution`)
and `setup()`, which wraps the model into an `Engine`. The loop, for each optimizer step:
forward -> backward (x accum) -> step. A recipe changes how gradients are reduced, where state lives
and how it is saved; never the order of the loop. How to add one: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from gpu_workbench.parallel.data import micro_batches
from gpu_workbench.parallel.models import recompute
from gpu_workbench.parallel.primitives.tensor_parallel import local
from gpu_workbench.parallel.recipes import loss_scale
from gpu_workbench.parallel.runtime import documents, memory
from gpu_workbench.parallel.runtime.dims import ParallelDims
from gpu_workbench.parallel.runtime.distributed import Context
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.profiling import range as prange

if TYPE_CHECKING:
    from gpu_workbench.parallel.config import RunConfig
    from gpu_workbench.parallel.data import Dataset
    from gpu_workbench.parallel.runtime.summary import RunSummary

# "spmd": one process per rank running the shared loop (under torchrun, or in Ray Train workers).
# "ray-actors" / "processes": the recipe starts its own workers from one driver process (`run`).
Execution = Literal["spmd", "ray-actors", "processes"]


@dataclass
class StepResult:
    loss_sum: torch.Tensor   # sum over this rank's micro-batches of their mean loss (float64)
    lr: float                # the rate this step used
    grad_norm: float         # before clipping
    applied: bool            # False when the step was skipped (non-finite gradient)
    loss_scale: float | None = None   # precision=fp16: the loss scale after this step (recipes/loss_scale.py)


class Recipe:
    """A parallelism recipe. Subclasses set the class attributes and override what differs."""

    name: str = ""
    execution: Execution = "spmd"
    data_parallel: Literal["replicate", "shard"] = "replicate"
    min_world: int = 1
    max_world: int | None = None
    needs_process_group: bool = True   # False: runs without torch.distributed (single)
    # tp.degree > 1: None where the recipe composes with tensor parallelism, else why not (one line to the user)
    tensor_parallel: str | None = "tensor parallelism composes only with --recipe ddp and fsdp"
    # cp.degree > 1: None where the recipe composes with context parallelism, else why not (one line to the user)
    context_parallel: str | None = "context parallelism composes only with --recipe ddp and fsdp"
    # --timeline (profiling.timeline): None where every rank writes the host timeline, else why not
    timeline: str | None = None
    # the format of its checkpoints; it reads only its own. "universal" (parallel/checkpoint/universal.py,
    # every recipe of the shared loop today): any such recipe on any layout reads them
    checkpoint_format: str = "universal"
    # eval.every > 0: None where the train loop evaluates the held-out split, else why not
    evaluation: str | None = None
    # checkpoint.incremental / checkpoint.async_save: None where this recipe's checkpoints do them, else why not
    checkpoint_modes: str | None = None
    # quant.qat != none: None where fake-quantised training runs (and is tested against single), else why not
    quant_aware: str | None = "quant.qat runs under recipes single, ddp and fsdp (ddp and fsdp tested to match single)"
    # ep.degree > 1: None where experts are split over data-parallel ranks (ddp, fsdp), else why not
    expert_parallel: str | None = "expert parallelism (ep.degree > 1) composes only with --recipe ddp and fsdp"
    # model.moe.experts > 0: None where a model with experts trains here, else why not
    experts: str | None = None
    # whether optim.frozen works here (the model is frozen before setup wraps it; torch AdamW recipes)
    freezes: bool = False

    def validate(self, cfg: RunConfig) -> None:
        """Checks of other sections that only this recipe can judge (no world size yet)."""
        if cfg.zero.config_file:
            raise UserError(f"zero.config_file (--deepspeed) needs a zero1/zero2/zero3 recipe, got recipe={self.name}")
        if cfg.zero.stage >= 0:
            raise UserError(f"zero.stage={cfg.zero.stage} only applies to the zero recipes, got recipe={self.name}")
        if cfg.checkpoint.load_from and self.execution != "spmd":
            raise UserError(f"checkpoint.load_from: recipe {self.name} starts its own workers and reads no "
                            f"checkpoints; start from one with single, ddp, fsdp, pipeline or local-sgd")
        documents.check(cfg, self)
        if cfg.data.kind == "tokens":   # the datasets' manifests, before any process starts (parallel/tokens/)
            from gpu_workbench.parallel.tokens.check import check_config

            check_config(cfg)

    def dims(self, cfg: RunConfig, world_size: int) -> ParallelDims:
        """How this recipe lays `world_size` ranks out (data parallelism takes what pp, cp, tp leave)."""
        if not self.min_world <= world_size <= (self.max_world or world_size):
            allowed = f"exactly {self.min_world}" if self.max_world == self.min_world else f"at least {self.min_world}"
            raise UserError(f"recipe '{self.name}' runs on {allowed} process(es), got world size (--nproc) "
                            f"{world_size}")
        return ParallelDims.for_world(world_size, self.data_parallel, pp=1, cp=cfg.cp.degree, tp=cfg.tp.degree,
                                      ep=cfg.ep.degree if self.expert_parallel is None else 1)

    def validate_layout(self, cfg: RunConfig, dims: ParallelDims) -> None:
        """Checks that need the layout (batch arithmetic a recipe adds). Default: none."""

    def memory_model(self, cfg: RunConfig) -> memory.MemoryModel:
        return memory.torch_adamw("none")

    def checkpoint_globals(self) -> tuple:
        """Non-tensor classes this recipe's engine pickles into its checkpoints, which a resume may load
        with torch.load(weights_only=True). Default: none (tensors, containers and plain values only)."""
        return ()

    def setup(self, model: nn.Module, cfg: RunConfig, ctx: Context) -> Engine:
        raise NotImplementedError(f"recipe {self.name} starts its own workers: call run()")

    def run(self, cfg: RunConfig, nproc: int) -> RunSummary:
        raise NotImplementedError(f"recipe {self.name} runs in the shared loop: call setup()")


def freeze(model: nn.Module, prefixes: list[str]) -> None:
    """requires_grad False on the parameters named by optim.frozen (a prefix at a dot boundary, so
    "blocks.1" is not "blocks.10"); before any wrapper (DDP, FSDP) sees the model."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            raise UserError(f"optim.frozen: '{prefix}' matches no parameter (names are like {names[0]!r}, "
                            f"{names[-1]!r})")
    for n, p in model.named_parameters():
        if any(n == prefix or n.startswith(prefix + ".") for prefix in prefixes):
            p.requires_grad_(False)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; not biases or norm weights (the usual GPT split). Frozen
    parameters (optim.frozen) are in neither: no moments, never stepped."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
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


def scale_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, factor: float) -> None:
    """The schedule's base rates and the optimizer's current rates, times `factor`."""
    scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["lr"] *= factor


def grad_norm(grads: list[torch.Tensor], group=None, summed: bool = False) -> torch.Tensor:
    """Global L2 norm of `grads` in float64. summed: every rank holds a disjoint part (shards, stages),
    so the squares are all-reduced over `group` (None: the default group) first."""
    sq = torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(
        (), dtype=torch.float64)
    if summed and dist.is_initialized():
        dist.all_reduce(sq, group=group)
    return sq.sqrt()


def clip_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale `grads` down so their norm is max_norm, when above it (max_norm > 0 and norm finite)."""
    if max_norm > 0 and torch.isfinite(norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, sharded: bool) -> torch.Tensor:
    """Norm of all gradients (summed over ranks when sharded, as FSDP's), then clipped to max_norm."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    norm = grad_norm(grads, summed=sharded)
    clip_(grads, norm, max_norm)
    return norm


class Engine(ABC):
    """What the train loop drives. Optional hooks have defaults; no caller probes for attributes."""

    cfg: RunConfig
    ctx: Context
    raw: nn.Module   # the unwrapped model (its state-dict names are the GPT's)
    # the activation bytes the first micro-batch's forward kept for backward (models/recompute.py); None: not
    # counted (tensor parallelism's DTensors, an engine with a train step of its own)
    activation_bytes: int | None = None
    scaler = None   # precision=fp16: the loss scaler (recipes/loss_scale.py), saved in every checkpoint

    @abstractmethod
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None: ...

    @abstractmethod
    def step(self) -> tuple[float, bool]:
        """Clip and update. Returns (grad norm before clipping, applied)."""

    @property
    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Parameters, gradients and optimizer state this rank holds (its shards only, where sharded)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict, unsharded, on CPU (collective for sharded recipes)."""

    @abstractmethod
    def save(self, path: Path, step: int, previous: dict | None = None):
        """Write this rank's part of the checkpoint after `step` steps into directory `path`. Collective.
        `previous`: the last checkpoint's meta.json (what an incremental save builds on). Returns a
        checkpoint.writer.Written (what is left to publish), or None where all is written."""

    @abstractmethod
    def load(self, path: Path, model_only: bool = False) -> None:
        """Read a checkpoint; model_only: the weights alone (fresh optimizer and schedule). Collective."""

    def train_step(self, dataset: Dataset, step: int, dp_rank: int, dp: int, on_backward=None) -> StepResult:
        """One optimizer step: this rank's micro-batches of global batch `step`, forward and backward each
        (loss / accum), then clip + update. A pipeline overrides it (its schedule runs the micro-batches)."""
        device = self.ctx.device
        autocast = loss_scale.autocast(self.cfg, device.type)
        mbs = micro_batches(self.cfg.global_batch, self.cfg.micro_batch, dp_rank, dp)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for j, indices in enumerate(mbs):
            with prange("data", mb=j):
                x, y = (t.to(device) for t in dataset.batch(step, indices))
                docs = _document_ids(self.cfg, dataset, step, indices, "train", device)
            with prange("fwd", mb=j), autocast, documents.using(docs), self._count_saved(j):
                loss = self.forward(x, y)
            with prange("bwd", mb=j):
                self.backward(loss, len(mbs), last=j == len(mbs) - 1)
            loss_sum += loss.detach().double().cpu()
            if on_backward is not None:
                on_backward(j, len(mbs))
        lr = self.lr   # the rate this step uses; step() moves the schedule on
        with prange("optimizer", step=step):
            norm, applied = self.step()
        return StepResult(loss_sum, lr, norm, applied, self.loss_scale())

    def loss_scale(self) -> float | None:
        """precision=fp16: the dynamic loss scale now; None where the engine scales no loss."""
        return None

    def _count_saved(self, j: int):
        """Around the first micro-batch's forward, once per run: counts the activation bytes kept for backward."""
        dims = self.ctx.dims
        if j or self.activation_bytes is not None or (dims is not None and dims.tp > 1):
            return contextlib.nullcontext()
        return recompute.SavedBytes(on_done=lambda n: setattr(self, "activation_bytes", n))

    def eval_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of one held-out micro-batch, called under no_grad; an engine whose forward keeps
        count of the training micro-batches overrides it."""
        return self.forward(x, y)

    def eval_loss(self, dataset: Dataset, batch: int, dp_rank: int, dp: int) -> torch.Tensor:
        """This rank's share of held-out global batch `batch`: the sum (float64) of its micro-batches' mean
        losses, as train_step's loss_sum, without gradients. A pipeline overrides it."""
        autocast = loss_scale.autocast(self.cfg, self.ctx.device.type)
        loss_sum = torch.zeros((), dtype=torch.float64)
        with torch.no_grad(), autocast:
            for indices in micro_batches(self.cfg.global_batch, self.cfg.micro_batch, dp_rank, dp):
                x, y = (t.to(self.ctx.device) for t in dataset.batch(batch, indices, split="val"))
                with documents.using(_document_ids(self.cfg, dataset, batch, indices, "val", self.ctx.device)):
                    loss_sum += self.eval_forward(x, y).detach().double().cpu()
        return loss_sum

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning-rate schedule by `factor` (nan_policy = 'rollback', after a load)."""
        raise NotImplementedError(f"{type(self).__name__} cannot change its learning rate")

    def params_on_rank(self, n_params: int) -> int:
        """Parameters the memory formula counts for this rank: the whole model unless a stage holds a part."""
        return n_params

    def summary_parts(self, run_dir: Path, steps_run: int, elapsed_s: float) -> dict[str, Any]:
        """Optional parts of the run summary this engine measured ({"comm": CommStats, ...}); here model.moe's
        routing (parallel/primitives/moe_summary.py). Collective."""
        from gpu_workbench.parallel.primitives import moe_summary

        return {"moe": moe_summary.part(self.raw, self.cfg, self.ctx.dims)}


class TorchEngine(Engine):
    """The torch recipes' engine (single, ddp, fsdp, ...): AdamW + LambdaLR + explicit global-norm clipping."""

    sharded = False

    def __init__(self, module: nn.Module, raw: nn.Module, cfg: RunConfig, ctx: Context):
        self.module, self.raw, self.cfg, self.ctx = module, raw, cfg, ctx
        self.optimizer = make_optimizer(module, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.scaler = loss_scale.make(cfg, ctx.device, self.sharded)   # precision=fp16, else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.module(x, y)

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        loss_scale.scaled(self.scaler, loss / accum).backward()

    def loss_scale(self) -> float | None:
        return None if self.scaler is None else float(self.scaler.get_scale())

    def step(self) -> tuple[float, bool]:
        """Clip, then step unless the gradient is NaN/Inf (fp16: unscaled first; an overflow skips)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = clip_grad_norm(list(self.module.parameters()), self.cfg.optim.grad_clip, self.sharded)
        return self._update(norm)

    def _update(self, norm: torch.Tensor) -> tuple[float, bool]:
        if self.scaler is not None:   # it skips the step on an overflow, whatever the norm says
            applied = loss_scale.update(self.scaler, self.optimizer, self.scheduler)
            self.optimizer.zero_grad(set_to_none=False)
            return float(norm), applied
        applied = bool(torch.isfinite(norm))
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)   # keep grad buffers (DDP bucket views) allocated
        return float(norm), applied

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def scale_lr(self, factor: float) -> None:
        scale_schedule(self.scheduler, factor)

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        params = [local(p) for p in self.module.parameters()]
        grads = [local(p.grad) for p in self.module.parameters() if p.grad is not None]
        state = [local(t) for s in self.optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.ndim > 0]
        return {"params": params, "grads": grads, "optimizer": state}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.raw.state_dict().items()}

    # Checkpoints: the universal format (parallel/checkpoint/universal.py), whatever the layout.
    def state_module(self) -> nn.Module:
        """The module whose state-dict names are the GPT's (the unwrapped model; a pipeline: its stages)."""
        return self.raw

    def writes_state(self) -> bool:
        """Whether this rank contributes tensors to a checkpoint: one copy of replicated state, the first
        data-parallel replica's ranks (every shard of a sharded layout, every TP rank and stage of it)."""
        dims = self.ctx.dims
        return dims is None or dims.coords(self.ctx.rank)["dp_replicate"] == 0

    def save(self, path: Path, step: int, previous: dict | None = None):
        from gpu_workbench.parallel.checkpoint import universal

        return universal.save(self, path, step, previous)

    def load(self, path: Path, model_only: bool = False) -> None:
        from gpu_workbench.parallel.checkpoint import universal

        universal.load(self, path, model_only)


def _document_ids(cfg: RunConfig, dataset, step: int, indices, split: str, device) -> torch.Tensor | None:
    """data.document_mask: each input token's document id in its window (parallel/runtime/documents.py); else None."""
    return dataset.documents(step, indices, split).to(device) if cfg.data.document_mask else None
