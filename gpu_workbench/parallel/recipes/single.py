"""`single`: one process, no communication. The reference every other recipe must match."""

from __future__ import annotations

from torch import nn

from gpu_workbench.parallel.primitives.parallelize import per_module_steps
from gpu_workbench.parallel.recipes.base import Context, Engine, Recipe, TorchEngine


class Single(Recipe):
    freezes = True
    quant_aware = None   # QATLinear inside the model (parallel/models/qat.py)
    min_world = max_world = 1
    needs_process_group = False
    tensor_parallel = "runs one process; use --recipe ddp (or fsdp) with --nproc >= tp.degree"

    def setup(self, model: nn.Module, cfg, ctx: Context) -> Engine:
        model.to(ctx.device)
        per_module_steps(model, cfg, ctx)   # parallelize's step 4 (precision=fp8, train.compile); nothing else applies
        return TorchEngine(model, model, cfg, ctx)
