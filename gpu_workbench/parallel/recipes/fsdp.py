"""`fsdp`: FSDP2 (`fully_shard`). Each block, then the root, becomes a unit whose parameters are
DTensors sharded across ranks (dim 0); a unit's parameters are all-gathered for its forward and
backward and its gradients reduce-scattered, so each rank keeps 1/N of params, grads and Adam state.

`fsdp.reshard_after_forward`: True frees the gathered parameters after forward (ZeRO-3-like),
False keeps them until backward (ZeRO-2-like: less communication, more memory).

`parallelize` (parallel/primitives/parallelize.py) lays the model out first: tensor parallelism (FSDP2 then shards
the TP DTensors further on dim 0: the 2-D layout), context parallelism, then fully_shard over one mesh
dimension spanning the dp_shard x cp ranks (torchtitan's "dp_shard_cp"), so the reduce-scatter averages
every rank's gradient of its positions' mean loss: the whole sequence's gradient, as for ddp x cp. The cp
groups of ring attention are process groups of their own (parallel/primitives/context_parallel.py).
"""

from __future__ import annotations

import torch
from torch import nn

from gpu_workbench.parallel.primitives.parallelize import parallelize
from gpu_workbench.parallel.recipes import loss_scale
from gpu_workbench.parallel.recipes.base import Context, Engine, Recipe
from gpu_workbench.parallel.recipes.parallel_engine import ParallelEngine
from gpu_workbench.parallel.runtime import memory


class FSDPEngine(ParallelEngine):
    """Sharded parameters: the reduce-scatter happens in backward, on the last micro-batch only."""

    def _backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        # Skip the reduce-scatter on all micro-batches but the last (FSDP2's no_sync).
        self.module.set_requires_gradient_sync(last)
        loss_scale.scaled(self.scaler, loss / accum).backward()


class FSDP(Recipe):
    freezes = True
    quant_aware = None   # QATLinear inside the model (parallel/models/qat.py)
    data_parallel = "shard"
    tensor_parallel = None   # TP inside each dp_shard (x cp) group: the 2-D layout
    context_parallel = None  # dp_shard x cp, sharded over both (module docstring)
    expert_parallel = None   # experts over ep.degree of the dp ranks (parallel/primitives/expert_parallel.py)

    def memory_model(self, cfg) -> memory.MemoryModel:
        if cfg.tp.degree > 1:
            from gpu_workbench.parallel.primitives import tensor_parallel

            return tensor_parallel.memory_model("os+g+p")
        return memory.torch_adamw("os+g+p")

    def reshard_after_forward(self, cfg) -> bool:
        return cfg.fsdp.reshard_after_forward

    def setup(self, model: nn.Module, cfg, ctx: Context) -> Engine:
        layout = parallelize(model, cfg, ctx, "fsdp", reshard=self.reshard_after_forward(cfg))
        return FSDPEngine(layout, cfg, ctx)
