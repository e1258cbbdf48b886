"""Time one optimizer step (4 micro-batches of the tiny GPT, forward + backward + AdamW) per recipe
on CPU, in this process, in a one-rank gloo group: the recipes' wrapping, hooks and sharding
machinery, not the network. `make bench` runs it; `make test` runs it once with --benchmark-disable."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.data import Dataset
from gpu_workbench.parallel.models.transformer import GPT
from gpu_workbench.parallel.recipes import RECIPES, resolve
from gpu_workbench.parallel.runtime.distributed import init_distributed
from tests.helpers.runs import TINY, skip_unless_runnable


@pytest.fixture(scope="module")
def one_rank_group():
    """One group for every recipe here: DeepSpeed caches the group it first sees for the process."""
    ctx = init_distributed(RunConfig.from_toml(TINY, ["recipe=ddp"]))
    yield ctx
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("recipe", ["single", "ddp", "zero1", "zero2", "zero3", "fsdp"])
def test_recipe_step(benchmark, recipe, one_rank_group):
    skip_unless_runnable(recipe)
    cfg = RunConfig.from_toml(TINY, [f"recipe={recipe}", "progress=false"])
    torch.manual_seed(0)
    one_rank_group.dims = resolve(cfg, world_size=1)
    engine = RECIPES[recipe].setup(GPT(cfg.model), cfg, one_rank_group)
    dataset = Dataset(cfg)
    step = iter(range(10**6))
    result = benchmark(lambda: engine.train_step(dataset, next(step), 0, 1))
    assert result.applied and torch.isfinite(result.loss_sum)
