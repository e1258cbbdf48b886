"""`zero1`, `zero2`, `zero3`: DeepSpeed ZeRO through `deepspeed.initialize`.

Stage 1 shards the optimizer state, stage 2 also the gradients, stage 3 also the parameters
(gathered layer by layer for forward and backward). The DeepSpeed config is generated from the
RunConfig (micro batch, accumulation, clipping, bf16, optimizer offload) unless the user passes
their own (`--deepspeed ds.json`, used as-is). The optimizer is the same torch AdamW the other
recipes use, handed to DeepSpeed as a client optimizer: no compiled FusedAdam/CPUAdam needed on CPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from gpu_workbench.parallel.config import RunConfig

from gpu_workbench.parallel.recipes.base import Context, Engine, Recipe, lr_lambda, make_optimizer, scale_schedule
from gpu_workbench.parallel.runtime import compat, memory
from gpu_workbench.parallel.runtime.errors import UserError

# DeepSpeed's ZeRO calls torch.distributed's deprecated all_gather_into_tensor / reduce_scatter_tensor
# on every step, and torch warns on every call: hidden (WB_DEBUG=1 keeps them), and said once.
DEPRECATED_CALLS = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def import_deepspeed(device_type: str):
    """deepspeed, imported with its accelerator named (no auto-detection warning on CPU) and its
    per-call deprecation warnings filtered; on CPU without building its inference-only shm op."""
    import warnings

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    if not os.environ.get("WB_DEBUG"):
        warnings.filterwarnings("ignore", message=DEPRECATED_CALLS, category=FutureWarning)
    try:
        import deepspeed
    except ImportError:   # the GPU image has no DeepSpeed: a user's choice of recipe, one line
        raise UserError("the ZeRO recipes (zero1/zero2/zero3) need DeepSpeed, which is not installed here: "
                        "pip install deepspeed") from None

    if device_type == "cpu":
        compat.skip_deepspeed_shm_comm()   # an inference-only op whose build costs ~40 s per environment
    return deepspeed


def ds_config(cfg: RunConfig, dp: int, stage: int) -> dict:
    """The DeepSpeed config equivalent to this RunConfig."""
    zero: dict = {"stage": stage}
    config: dict = {}
    if cfg.zero.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        # Torch AdamW on the CPU partitions: the same arithmetic as every other recipe, and no
        # compiled DeepSpeedCPUAdam (a ds.json with an "optimizer" block gets DeepSpeed's instead).
        config["zero_force_ds_cpu_optimizer"] = False
    return config | {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.accum_steps(dp),
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,   # torch AdamW as the client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def user_config(cfg: RunConfig, dp: int, stage: int) -> dict:
    """A user's DeepSpeed JSON, as-is, checked against the RunConfig: the loop feeds micro-batches by
    the RunConfig, so DeepSpeed's batch arithmetic must agree with it."""
    path = cfg.zero.config_file
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--deepspeed {path}: not valid JSON: {e}") from None
    ours = ds_config(cfg, dp, stage)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in config and config[key] not in (ours[key], "auto"):
            raise UserError(f"--deepspeed {path}: {key}={config[key]} disagrees with the run config (global_batch="
                             f"{cfg.global_batch}, micro_batch={cfg.micro_batch}, dp={dp} -> {ours[key]})")
        config[key] = ours[key]
    theirs = config.get("zero_optimization", {}).get("stage", 0)
    if theirs != stage:
        raise UserError(f"--deepspeed {path}: zero_optimization.stage={theirs} disagrees with recipe={cfg.recipe}")
    if "optimizer" not in config:   # ours (torch AdamW) goes in as a client optimizer
        config.setdefault("zero_allow_untested_optimizer", True)
    return config


class DeepSpeedEngine(Engine):
    """Adapts a DeepSpeedEngine to the loop's interface (see recipes/base.py)."""

    sharded = True

    def __init__(self, engine, raw: nn.Module, cfg: RunConfig, ctx: Context):
        self.module, self.raw, self.cfg, self.ctx = engine, raw, cfg, ctx
        self.stage = engine.zero_optimization_stage()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.module(x, y)

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        # DeepSpeed divides by its gradient_accumulation_steps itself and reduces at the boundary;
        # it counts micro-batches in engine.step(), which only updates on the last one.
        assert accum == self.module.gradient_accumulation_steps()
        self.module.backward(loss)
        if not last:
            self.module.step()

    def step(self) -> tuple[float, bool]:
        # Clipping, the NaN/Inf check (skip on overflow) and the LR schedule are inside engine.step().
        assert self.module.is_gradient_accumulation_boundary()
        self.module.step()
        norm = self.module.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm, bool(self.module.was_step_applied())

    @property
    def lr(self) -> float:
        return self.module.get_lr()[0]

    def scale_lr(self, factor: float) -> None:
        if self.module.lr_scheduler is None:
            raise NotImplementedError("a --deepspeed config with its own scheduler: nan_policy = 'rollback' "
                                      "cannot lower its learning rate")
        scale_schedule(self.module.lr_scheduler, factor)

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """What this rank holds: module parameters (stage 3: their partitions), gradient partitions,
        the fp32 master partition and Adam's moments. Read from ZeRO's optimizer, whose attribute
        names differ by stage and version: a missing one counts as nothing rather than failing the run."""
        opt = self.module.optimizer
        mods = list(self.module.module.parameters())

        def attr(name: str) -> list:
            value = getattr(opt, name, None) or []
            return list(value.values()) if isinstance(value, dict) else list(value)

        if self.stage == 3:
            params = [p.ds_tensor for p in mods if hasattr(p, "ds_tensor")] + attr("fp16_partitioned_groups_flat")
            master = attr("fp32_partitioned_groups_flat")
            grads = [t.grad for t in master] + attr("_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
        else:
            params = mods + attr("bit16_groups_flat")
            master = attr("single_partition_of_fp32_groups")
            grads = [p.grad for p in mods] + [t.grad for t in master]
            grads += [g for group in attr("averaged_gradients") for g in (group or [])]
        state = [t for s in opt.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]
        return {"params": params, "grads": [g for g in grads if g is not None], "optimizer": master + state}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed

        params = list(self.raw.parameters()) if self.stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):   # all-gather (stage 3)
            return {k: v.detach().cpu().clone() for k, v in self.raw.state_dict().items()}

    # Checkpoints: the universal format, consolidated through DeepSpeed's tensor-fragment API
    def save(self, path: Path, step: int, previous: dict | None = None) -> None:
        """Always a full checkpoint, written in the foreground (Recipe.checkpoint_modes)."""
        from gpu_workbench.parallel.checkpoint import zero_universal

        zero_universal.save(self, path, step)

    def load(self, path: Path, model_only: bool = False) -> None:
        from gpu_workbench.parallel.checkpoint import zero_universal

        zero_universal.load(self, path, model_only)


class Zero(Recipe):
    """ZeRO stage `stage` (the subclasses below); `zero.stage` may restate it, never contradict it."""

    stage = 0
    tensor_parallel = ("DeepSpeed's ZeRO partitions flat parameter buffers and cannot hold DTensor shards; "
                       "use --recipe fsdp")
    data_parallel = "shard"
    checkpoint_modes = ("its state is gathered from DeepSpeed's flat partitions and written whole, in the "
                        "foreground; use --recipe fsdp for sharded incremental or asynchronous checkpoints")

    def validate(self, cfg: RunConfig) -> None:
        if cfg.zero.stage >= 0 and cfg.zero.stage != self.stage:
            raise UserError(f"zero.stage={cfg.zero.stage} contradicts recipe={self.name}")

    def validate_layout(self, cfg: RunConfig, dims) -> None:
        if cfg.zero.config_file:   # the user's DeepSpeed JSON must agree with this config's batch sizes
            user_config(cfg, dims.dp, self.stage)

    def checkpoint_globals(self) -> tuple:
        """The few non-tensor classes DeepSpeed pickles into its checkpoints."""
        import_deepspeed("cuda" if torch.cuda.is_available() else "cpu")
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        return LossScaler, ZeroStageEnum, fragment_address

    def memory_model(self, cfg: RunConfig) -> memory.MemoryModel:
        sharded = {1: "os", 2: "os+g", 3: "os+g+p"}[self.stage]
        if cfg.precision == "bf16":
            return memory.MemoryModel(2, 2, 12, sharded)   # 16-bit params and grads, fp32 master + moments
        return memory.MemoryModel(4, 4, 12, sharded)       # fp32 master partition kept although params are fp32

    def setup(self, model: nn.Module, cfg: RunConfig, ctx: Context) -> Engine:
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))   # DeepSpeed asserts it; absent outside torchrun
        deepspeed = import_deepspeed(ctx.device.type)
        if ctx.is_main and not os.environ.get("WB_DEBUG"):
            print("wb: DeepSpeed's per-step FutureWarnings about deprecated torch.distributed calls are hidden "
                  "(WB_DEBUG=1 shows them)", file=sys.stderr)
        dp = ctx.dims.dp
        config = user_config(cfg, dp, self.stage) if cfg.zero.config_file else ds_config(cfg, dp, self.stage)
        model.to(ctx.device)
        optimizer = None if "optimizer" in config else make_optimizer(model, cfg)
        scheduler = None if "scheduler" in config else (
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                          model_parameters=None if optimizer else model.parameters())
        return DeepSpeedEngine(engine, model, cfg, ctx)


class Zero1(Zero):
    stage = 1


class Zero2(Zero):
    stage = 2


class Zero3(Zero):
    stage = 3
