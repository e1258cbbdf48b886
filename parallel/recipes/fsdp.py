"""`fsdp`: FSDP2 (`fully_shard`). Each block, then the root, becomes a unit whose parameters are
DTensors sharded across ranks (dim 0); a unit's parameters are all-gathered for its forward and
backward and its gradients reduce-scattered, so each rank keeps 1/N of params, grads and Adam state.

`fsdp.reshard_after_forward`: True frees the gathered parameters after forward (ZeRO-3-like),
False keeps them until backward (ZeRO-2-like: less communication, more memory).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from parallel import memory
from parallel.recipes.base import Context, Engine, Recipe, TorchEngine


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


class FSDP(Recipe):
    freezes = True
    data_parallel = "shard"
    tensor_parallel = None   # TP inside each dp_shard group: the 2-D layout

    def memory_model(self, cfg) -> memory.MemoryModel:
        if cfg.tp.degree > 1:
            from parallel import tensor_parallel

            return tensor_parallel.memory_model("os+g+p")
        return memory.torch_adamw("os+g+p")

    def reshard_after_forward(self, cfg) -> bool:
        return cfg.fsdp.reshard_after_forward

    def setup(self, model: nn.Module, cfg, ctx: Context) -> Engine:
        from torch.distributed.fsdp import fully_shard

        reshard = self.reshard_after_forward(cfg)
        if cfg.tp.degree > 1:   # the 2-D layout: tensor parallel, then sharded over dp_shard
            from parallel import tensor_parallel

            return tensor_parallel.setup_fsdp(model, cfg, ctx, reshard)
        model.to(ctx.device)
        mesh = ctx.dims.build_mesh(ctx.device.type, ("dp_shard",))
        for block in model.blocks:          # one unit per block: gathered one at a time
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)   # embeddings, final norm, head
        return FSDPEngine(model, model, cfg, ctx)
