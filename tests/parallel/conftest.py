"""Shared, session-scoped runs: one torchrun launch trains every data-parallel recipe (fp32 for
equivalence, bf16 for the mixed-precision memory table); the single-process reference runs here."""

from __future__ import annotations

import pytest

from tests.parallel.runs import BASE, TINY, torchrun

DP_RECIPES = ["ddp", "zero1", "zero2", "zero3", "fsdp"]
MEMORY_RECIPES = ["ddp", "zero1", "zero2", "zero3"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """`single`, 10 fp32 steps, in this process."""
    from parallel import RunConfig, train

    run_dir = tmp_path_factory.mktemp("single")
    train(RunConfig.from_toml(TINY, [*BASE, "recipe=single", f"run_dir={run_dir}"]))
    return run_dir


@pytest.fixture(scope="session")
def dp_runs(tmp_path_factory):
    """{(recipe, precision): run_dir} for 2-process runs, all from one torchrun launch."""
    root = tmp_path_factory.mktemp("dp")
    runs, dirs = [], {}
    for recipe in DP_RECIPES:
        dirs[recipe, "fp32"] = root / f"{recipe}-fp32"
        runs.append((TINY, [*BASE, f"recipe={recipe}", f"run_dir={dirs[recipe, 'fp32']}"]))
    for recipe in MEMORY_RECIPES:   # mixed precision, 2 steps: the model-state memory after one step
        dirs[recipe, "bf16"] = root / f"{recipe}-bf16"
        runs.append((TINY, [*BASE, f"recipe={recipe}", "precision=bf16", "steps=2", "checkpoint.save_final=false",
                            f"run_dir={dirs[recipe, 'bf16']}"]))
    torchrun(2, runs)
    return dirs
