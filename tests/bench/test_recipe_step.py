"""Time one optimizer step (4 micro-batches of the tiny GPT, forward + backward + AdamW) per recipe
on CPU, in this process (a one-rank gloo group for ddp and fsdp: their wrapping and hooks, not the
network). `make bench` runs it; `make test` runs it once with --benchmark-disable."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel import RunConfig
from parallel.data import Dataset
from parallel.model import GPT
from parallel.recipes import RECIPES
from parallel.train import init_distributed, train_step
from tests.parallel.runs import TINY


@pytest.mark.parametrize("recipe", ["single", "ddp", "fsdp"])
def test_recipe_step(benchmark, recipe):
    cfg = RunConfig.from_toml(TINY, [f"recipe={recipe}", "progress=false"])
    ctx = init_distributed(cfg)
    try:
        torch.manual_seed(0)
        engine = RECIPES[recipe].setup(GPT(cfg.model), cfg, ctx)
        dataset = Dataset(cfg)
        step = iter(range(10**6))
        loss_sum, lr, norm, applied = benchmark(lambda: train_step(engine, dataset, cfg, next(step), 0, 1, ctx.device))
        assert applied and torch.isfinite(loss_sum)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
