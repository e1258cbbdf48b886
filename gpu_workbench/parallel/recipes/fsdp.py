"""`fsdp`: FSDP2 (`fully_shard`). Each block, then the root, becomes a unit whose parameters are
DTensors sharded across ranks (dim 0); a unit's parameters are all-gathered for its forward and
backward and its gradients reduce-scattered, so each rank keeps 1/N of params, grads and Adam state.

`fsdp.reshard_after_forward`: True frees the gathered parameters after forward (ZeRO-3-like),
False keeps them until backward (ZeRO-2-like: less communication, more memory).

Context parallelism (`cp.degree = C > 1`, dp_shard x cp): `fully_shard` over one mesh dimension spanning
all dp_shard x cp ranks (torchtitan's "dp_shard_cp"), so the reduce-scatter averages every rank's gradient
of its positions' mean loss: the whole sequence's gradient, as for ddp x cp. The cp groups of ring
attention are process groups of their own (parallel/context_parallel.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from gpu_workbench.parallel import memory
from gpu_workbench.parallel.context_parallel import CPEngineMixin, setup_rank
from gpu_workbench.parallel.errors import UserError
from gpu_workbench.parallel.recipes.base import Context, Engine, Recipe, TorchEngine


class DCPEngine(TorchEngine):
    """A TorchEngine whose parameters are DTensors (FSDP2, tensor parallelism): the full state dict gathers
    them (checkpoints: the universal format, as every torch engine's)."""

    sharded = True   # the clipping norm sums squares over every rank's shard

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in self.module.state_dict().items():
            v = v.full_tensor() if isinstance(v, DTensor) else v   # all-gather: collective
            out[k] = v.detach().cpu().clone()
        return out


class FSDPEngine(DCPEngine):
    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        # Skip the reduce-scatter on all micro-batches but the last (FSDP2's no_sync).
        self.module.set_requires_gradient_sync(last)
        (loss / accum).backward()


class FSDPCPEngine(CPEngineMixin, FSDPEngine):
    """fsdp over dp_shard x cp: this rank's positions of every sequence, ring attention over its cp group."""

    def __init__(self, module: nn.Module, raw: nn.Module, cfg, ctx: Context, positions: torch.Tensor, cp_stats):
        super().__init__(module, raw, cfg, ctx)
        self.positions, self.cp_stats = positions, cp_stats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from gpu_workbench.parallel.context_parallel import shard_sequence

        p = self.positions
        return self.module(shard_sequence(x, p), shard_sequence(y, p), p)   # the mean over this rank's tokens

    def summary_parts(self, run_dir, steps: int, elapsed_s: float) -> dict:
        return self.cp_summary()


def _shard_cp_mesh(ctx: Context):
    """One mesh dimension over the dp_shard x cp ranks (all of them: fsdp x cp leaves no other dimension)."""
    from torch.distributed.device_mesh import init_device_mesh

    if ctx.dims.tp > 1 or ctx.dims.pp > 1:
        raise ValueError("fsdp x cp shards over every rank: tp and pp must be 1")
    return init_device_mesh(ctx.device.type, (ctx.dims.world_size,), mesh_dim_names=("dp_shard_cp",))


class FSDP(Recipe):
    freezes = True
    quant_aware = None   # QATLinear inside the model (parallel/qat.py)
    data_parallel = "shard"
    tensor_parallel = None   # TP inside each dp_shard group: the 2-D layout
    context_parallel = None  # dp_shard x cp, sharded over both (module docstring)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if cfg.cp.degree > 1 and cfg.tp.degree > 1:
            raise UserError(f"cp.degree = {cfg.cp.degree} with tp.degree = {cfg.tp.degree}: recipe=fsdp composes "
                            f"context parallelism with data parallelism only (sharding over dp_shard x cp beside tp "
                            f"needs one 2-D mesh of the two, not built); use recipe=ddp or tp.degree=1")

    def memory_model(self, cfg) -> memory.MemoryModel:
        if cfg.tp.degree > 1:
            from gpu_workbench.parallel import tensor_parallel

            return tensor_parallel.memory_model("os+g+p")
        return memory.torch_adamw("os+g+p")

    def reshard_after_forward(self, cfg) -> bool:
        return cfg.fsdp.reshard_after_forward

    def setup(self, model: nn.Module, cfg, ctx: Context) -> Engine:
        from torch.distributed.fsdp import fully_shard

        reshard = self.reshard_after_forward(cfg)
        if cfg.tp.degree > 1:   # the 2-D layout: tensor parallel, then sharded over dp_shard
            from gpu_workbench.parallel import tensor_parallel

            return tensor_parallel.setup_fsdp(model, cfg, ctx, reshard)
        model.to(ctx.device)
        cp = setup_rank(model, cfg, ctx) if cfg.cp.degree > 1 else None
        mesh = ctx.dims.build_mesh(ctx.device.type, ("dp_shard",)) if cp is None else _shard_cp_mesh(ctx)
        for block in model.blocks:          # one unit per block: gathered one at a time
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)   # embeddings, final norm, head
        return FSDPEngine(model, model, cfg, ctx) if cp is None else FSDPCPEngine(model, model, cfg, ctx, *cp)
