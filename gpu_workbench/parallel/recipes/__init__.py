"""The recipe registry: name -> Recipe object, and `resolve`, which validates a run before it starts.

    recipe = RECIPES["zero2"]                    # imports parallel/recipes/deepspeed_zero.py on first use
    dims = resolve(cfg, world_size=2)            # config + recipe + layout checks; the ParallelDims

Recipe modules are imported only when asked for, so `import parallel` imports neither DeepSpeed nor
Ray. Adding a recipe: a file here with a Recipe subclass, and one line below (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.registry import LazyRegistry

if TYPE_CHECKING:   # the names are known without importing torch; a recipe's module imports it when loaded
    from gpu_workbench.parallel.config import RunConfig
    from gpu_workbench.parallel.recipes.base import Recipe
    from gpu_workbench.parallel.runtime.dims import ParallelDims

# name -> "module:Class" (one module may define several recipes)
_WHERE = {
    "single": "single:Single",
    "ddp": "ddp:DDP",
    "zero1": "deepspeed_zero:Zero1",
    "zero2": "deepspeed_zero:Zero2",
    "zero3": "deepspeed_zero:Zero3",
    "fsdp": "fsdp:FSDP",
    "pipeline": "pipeline:Pipeline",
    "async-ps": "async_ps:AsyncPS",
    "local-sgd": "local_sgd:LocalSGD",
    "diloco": "local_sgd:DiLoCo",
    "hogwild": "hogwild:Hogwild",
}


def _instance(cls, name: str) -> Recipe:
    recipe = cls()
    recipe.name = name
    return recipe


RECIPES = LazyRegistry(_WHERE, "gpu_workbench.parallel.recipes", make=_instance)


def get(name: str) -> Recipe:
    """The recipe called `name`, or a UserError that suggests the closest name."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"recipe: unknown recipe '{name}'{hint}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def resolve(cfg: RunConfig, world_size: int) -> ParallelDims:
    """Every check a run needs before any process starts: the config's fields, the recipe's own, and
    the layout of `world_size` ranks. Returns the parallel dimensions."""
    if world_size < 1:
        raise UserError(f"world size (--nproc) must be >= 1, got {world_size}")
    recipe = get(cfg.recipe)
    cfg.validate()
    recipe.validate(cfg)
    # here, not in Recipe.validate: some recipes override that without calling super()
    if cfg.optim.frozen and not recipe.freezes:
        raise UserError(f"optim.frozen: recipe {cfg.recipe} does not freeze parameters; use single, ddp or fsdp")
    if cfg.optim.frozen and cfg.tp.degree > 1:   # untested: tensor-parallel plans with frozen DTensors
        raise UserError(f"optim.frozen with tp.degree={cfg.tp.degree}: freezing is for tp.degree=1 only")
    for key in ("incremental", "async_save"):
        if getattr(cfg.checkpoint, key) and recipe.checkpoint_modes is not None:
            raise UserError(f"checkpoint.{key} does not work with recipe={cfg.recipe}: {recipe.checkpoint_modes}")
    if cfg.profiling.timeline and recipe.timeline is not None:
        raise UserError(f"--timeline (profiling.timeline) does not work with recipe={cfg.recipe}: {recipe.timeline}")
    if cfg.eval.every and recipe.evaluation is not None:
        raise UserError(f"eval.every does not work with recipe={cfg.recipe}: {recipe.evaluation}")
    if cfg.tp.degree > 1:   # which recipes compose with tensor parallelism, what must divide by tp.degree
        from gpu_workbench.parallel.primitives import tensor_parallel

        tensor_parallel.validate(cfg, recipe.tensor_parallel)
    if cfg.quant.qat != "none":   # which recipes run QAT, and quant.group_size against the layers
        from gpu_workbench.parallel.models import qat

        qat.validate(cfg, recipe.quant_aware)
    from gpu_workbench.parallel.primitives import compilation, float8
    from gpu_workbench.parallel.recipes import loss_scale

    compilation.validate(cfg)   # train.compile: where it cannot compile
    loss_scale.validate(cfg)    # precision=fp16: where the loss scaler runs
    float8.validate(cfg)        # precision=fp8: where float8 linears run, and torchao
    if cfg.cp.degree > 1 and recipe.context_parallel is not None:
        raise UserError(f"cp.degree = {cfg.cp.degree} does not work with recipe={cfg.recipe}: "
                        f"{recipe.context_parallel}")
    if cfg.model.moe.experts and recipe.experts is not None:
        raise UserError(f"model.moe.experts does not work with recipe={cfg.recipe}: {recipe.experts}")
    if cfg.ep.degree > 1 and recipe.expert_parallel is not None:
        raise UserError(f"ep.degree = {cfg.ep.degree} does not work with recipe={cfg.recipe}: {recipe.expert_parallel}")
    dims = recipe.dims(cfg, world_size)
    if cfg.ep.degree > 1:   # experts to split, sizes that divide, what composes
        from gpu_workbench.parallel.primitives import expert_parallel

        expert_parallel.validate(cfg, dims)
    recipe.validate_layout(cfg, dims)   # first: a pipeline's pp.microbatches sets micro_batch
    cfg.check_layout(world_size, dims.dp)
    return dims
