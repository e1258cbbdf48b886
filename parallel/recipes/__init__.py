"""Recipe registry: name -> how to set it up and which world sizes it can use.

A recipe module has `setup(model, cfg, ctx) -> engine` (see recipes/base.py for the engine's
interface) and is imported only when used, so `import parallel` does not import DeepSpeed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RecipeSpec:
    module: str                  # parallel.recipes.<file>, which defines setup(model, cfg, ctx)
    min_world: int = 1
    max_world: int | None = None
    # data-parallel degree for a world size (pipeline recipes divide by the number of stages)
    dp_degree: Callable = lambda cfg, world_size: world_size
    # "torchrun": one process per rank, `setup` wraps the model for the shared loop. Anything else
    # ("ray", "mp") launches its own workers: `wb train` calls train(cfg, nproc) once, in-process, and
    # the module's `run(cfg, nproc) -> summary` does the rest.
    launcher: str = "torchrun"

    def setup(self, model, cfg, ctx):
        return importlib.import_module(self.module).setup(model, cfg, ctx)

    def run(self, cfg, nproc: int) -> dict:
        return importlib.import_module(self.module).run(cfg, nproc)


RECIPES: dict[str, RecipeSpec] = {
    "single": RecipeSpec("parallel.recipes.single", min_world=1, max_world=1),
    "ddp": RecipeSpec("parallel.recipes.ddp"),
    "zero1": RecipeSpec("parallel.recipes.deepspeed_zero"),
    "zero2": RecipeSpec("parallel.recipes.deepspeed_zero"),
    "zero3": RecipeSpec("parallel.recipes.deepspeed_zero"),
    "fsdp": RecipeSpec("parallel.recipes.fsdp"),
    "async-ps": RecipeSpec("parallel.recipes.async_ps", launcher="ray"),
    "hogwild": RecipeSpec("parallel.recipes.hogwild", launcher="mp"),
    "local-sgd": RecipeSpec("parallel.recipes.local_sgd"),
    "diloco": RecipeSpec("parallel.recipes.local_sgd"),
    "pipeline": RecipeSpec("parallel.recipes.pipeline",
                           dp_degree=lambda cfg, world_size: world_size // (cfg.pp.degree or world_size)),
}
