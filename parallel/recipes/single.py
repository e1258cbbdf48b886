"""`single`: one process, no communication. The reference every other recipe must match."""

from __future__ import annotations

from torch import nn

from parallel.config import RunConfig
from parallel.recipes.base import Context, Engine


def setup(model: nn.Module, cfg: RunConfig, ctx: Context) -> Engine:
    model.to(ctx.device)
    return Engine(model, model, cfg, ctx)
