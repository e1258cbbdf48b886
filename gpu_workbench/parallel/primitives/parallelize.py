"""`parallelize(model, cfg, ctx, data_parallel)`: every parallelism applied to one model, in one written order
(docs/ARCHITECTURE.md, Parallelize):

    1. tensor (and sequence) parallelism   parameters become DTensors on the mesh's tp dimension
    2. context parallelism                 every attention module attends through ring attention over its
                                           cp group; the rank keeps its positions of every sequence
    2b. expert parallelism                 each MoE layer's experts sharded over ep ranks borrowed from data
                                           parallelism, tokens exchanged by all-to-all (expert_parallel.py);
                                           the data-parallel wrapper leaves the experts alone
    3. activation checkpointing            inside the model (model.activation_checkpointing: GPT.run_blocks,
                                           models/recompute.py), around each block's call
    4. per-module steps                    PER_MODULE_STEPS, in order: the blocks' linears to torchao's
                                           Float8Linear (precision=fp8: primitives/float8.py), then each block's
                                           forward torch.compile(fullgraph=True)d (train.compile: compilation.py)
    5. data parallelism                    "ddp": DistributedDataParallel, or, over DTensor parameters (which
                                           DDP does not take), a by-hand gradient average over this rank's
                                           dp_replicate x cp group; "fsdp": fully_shard per block and at the
                                           root, over dp_shard (x cp); "none": nothing

It returns a `Layout`: what the engine needs to know of what was done. DeepSpeed ZeRO wraps the model in an
engine of its own and does not come here; the pipeline applies step 1 to each of its stages
(parallel/recipes/pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from gpu_workbench.parallel import models
from gpu_workbench.parallel.primitives import compilation, context_parallel, expert_parallel, float8, tensor_parallel
from gpu_workbench.parallel.primitives.comm import CommCounter
from gpu_workbench.parallel.runtime import compat

if TYPE_CHECKING:
    from gpu_workbench.parallel.runtime.distributed import Context

DataParallel = Literal["ddp", "fsdp", "none"]
# Step 4: functions (model, cfg, ctx) -> None applied in this order after activation checkpointing and before
# the data-parallel wrapper: the blocks' linears to float8 (precision=fp8), then each block's forward compiled
# (train.compile), torchtitan's order.
PER_MODULE_STEPS: list = [float8.step, compilation.step]


@dataclass
class Layout:
    """What `parallelize` did to the model, for the engine that drives it."""

    module: nn.Module                    # what forward calls: the DDP wrapper, or the model itself
    model: nn.Module                     # the model (its state-dict names are the architecture's)
    tp: bool = False                     # DTensor parameters on a tp mesh (loss_parallel, replica-aware norm)
    positions: torch.Tensor | None = None    # context parallelism: this rank's positions of every sequence
    cp_stats: context_parallel.ContextParallelStats | None = None   # the ring's measured blocks and bytes
    grad_group: object = None            # by-hand gradient average: its process group (ddp over DTensors)
    grad_group_name: str = ""            # that group's dimensions, for the timeline
    grad_group_size: int = 1
    comm: CommCounter | None = None      # data-parallel gradient bytes (ddp)
    sharded: bool = False                # parameters sharded by data parallelism (fsdp)
    experts: expert_parallel.ExpertLayout | None = None   # expert parallelism: the experts' own gradient group


def parallelize(model: nn.Module, cfg, ctx: Context, data_parallel: DataParallel, reshard: bool = True) -> Layout:
    """Apply tp, cp, the per-module steps and `data_parallel` to `model` in place, in that order. `reshard`:
    fsdp frees gathered parameters after forward. Collective: every rank makes the same meshes and groups in
    the same order."""
    dims = ctx.dims
    model.to(ctx.device)
    shard_mesh, tp_mesh = _meshes(dims, data_parallel, mesh_device_type(ctx.device))
    layout = Layout(module=model, model=model, tp=dims.tp > 1)
    if dims.tp > 1:                                                        # 1. tensor parallelism
        tensor_parallel.apply(model, tp_mesh, cfg.tp.sequence_parallel, models.get(cfg.model.arch))
    if dims.cp > 1:                                                        # 2. context parallelism
        layout.positions, layout.cp_stats = context_parallel.setup_rank(model, cfg, ctx)
    if dims.ep > 1:                                                        # 2b. expert parallelism
        layout.experts = expert_parallel.apply(model, cfg, ctx, mesh_device_type(ctx.device))
    # 3. activation checkpointing: the model recomputes its blocks itself (model.activation_checkpointing)
    per_module_steps(model, cfg, ctx)                                      # 4. per-module steps
    if data_parallel == "ddp":                                             # 5. data parallelism
        _replicate(layout, dims, ctx, shard_mesh)
    elif data_parallel == "fsdp":
        if layout.experts is not None:   # the experts' own units first: the blocks' then leave them alone
            expert_parallel.shard(model, layout.experts, reshard)
        _shard(model, shard_mesh, reshard)
        layout.sharded = True
    return layout


def per_module_steps(model: nn.Module, cfg, ctx: Context) -> None:
    """Step 4 alone: what one process (recipe single, no process group) takes of `parallelize`."""
    for step in PER_MODULE_STEPS:
        step(model, cfg, ctx)


def mesh_device_type(device: torch.device) -> str:
    """The meshes' device type: a dry run's meta-device model lays out over a CPU mesh of the fake process
    group (parallel/tools/dry_run.py), as FSDP takes its device from the mesh."""
    return "cpu" if device.type == "meta" else device.type


def _meshes(dims, data_parallel: DataParallel, device_type: str):
    """(the data-parallel mesh or None, the tp mesh or None). fsdp shards over dp_shard x cp, one mesh
    dimension (torchtitan's dp_shard_cp): cp varies faster than dp_shard and slower than tp, so the ranks
    that share a tp coordinate are one row of a (dp_shard x cp, tp) mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    if data_parallel == "fsdp":
        if dims.cp == 1:
            mesh = dims.build_mesh(device_type, ("dp_shard", "tp") if dims.tp > 1 else ("dp_shard",))
            return mesh["dp_shard"], mesh["tp"] if dims.tp > 1 else None
        if dims.pp > 1 or dims.dp_replicate > 1:
            raise ValueError("fsdp x cp shards over dp_shard x cp: pp and dp_replicate must be 1")
        if dims.tp == 1:
            return init_device_mesh(device_type, (dims.world_size,), mesh_dim_names=("dp_shard_cp",)), None
        mesh = init_device_mesh(device_type, (dims.dp_shard * dims.cp, dims.tp), mesh_dim_names=("dp_shard_cp", "tp"))
        return mesh["dp_shard_cp"], mesh["tp"]
    if dims.tp > 1:   # ddp over DTensors: the gradient average is by hand over dp_replicate (x cp)
        mesh = dims.build_mesh(device_type, ("dp_replicate", "cp", "tp") if dims.cp > 1 else ("dp_replicate", "tp"))
        return mesh, mesh["tp"]
    return None, None


def _replicate(layout: Layout, dims, ctx: Context, mesh) -> None:
    """ddp: DistributedDataParallel over plain parameters; over DTensor parameters a group for the engine's
    by-hand average: the ranks with this rank's tp coordinate (dp_replicate, x cp under context parallelism)."""
    from torch.nn.parallel import DistributedDataParallel

    layout.comm = CommCounter()
    if layout.tp:
        if dims.cp > 1:
            members = dims.groups(("dp_replicate", "cp"))
            layout.grad_group = context_parallel.own_group(members, ctx.rank)
            layout.grad_group_name, layout.grad_group_size = "dp_replicate x cp", dims.dp_replicate * dims.cp
        else:
            layout.grad_group = mesh["dp_replicate"].get_group()
            layout.grad_group_name, layout.grad_group_size = "dp_replicate", dims.dp_replicate
        return
    if ctx.device.type == "meta":   # a dry run: DDP checks shapes across ranks with .item(), which meta
        return                      # tensors refuse; its buckets hold what the plain gradients hold
    if layout.experts is not None:
        ids = {id(p) for p in layout.experts.params}
        compat.ddp_ignore(layout.model, [n for n, p in layout.model.named_parameters() if id(p) in ids])
    # gradient_as_bucket_view: .grad are views into the reduction buckets, so a rank holds one copy of the
    # gradients (4 bytes/param), as the ZeRO formula for plain data parallelism assumes.
    layout.module = DistributedDataParallel(layout.model, gradient_as_bucket_view=True,
                                            device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)


def _shard(model: nn.Module, mesh, reshard: bool) -> None:
    """fsdp: one FSDP2 unit per block (gathered one at a time), then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
