"""A dry run: a layout of any world size laid out in this one process, on the meta device, over torch's fake
process group (docs/ARCHITECTURE.md, Dry runs).

    result = dry_run(cfg, world_size=512)      # the real resolve, the real recipe.setup (parallelize)
    result.by_rank[r]["params"], result.to_json()

For each rank it checks, it starts the fake group as that rank, builds the model on the meta device, and
hands it to the recipe's own `setup`: tensor-parallel plans, FSDP2 sharding, the pipeline's split run as in
a real launch, and no tensor holds data. Then it gives each trained parameter the gradient and the two AdamW
moments the engine will hold after a step (what torch's AdamW creates: zeros_like the parameter), and
measures the bytes with the same ruler as the real run (memory.held_bytes over engine.held_tensors()).
The meta device cannot run FSDP2's forward, so one step's collectives and the activations come from the
layout and the formulas (parallel/tools/dry_collectives.py, parallel/primitives/activations.py).

Which ranks: one per distinct stage, tensor and shard coordinate would be thousands of model builds at 512
ranks. Ranks with the same pipeline coordinate hold the same bytes when the shards divide evenly (TP's
divisibility is checked up front), so the dry run lays out the first and the last rank of each stage and
gives the ranks between the first one's figures. Where FSDP2's dim-0 shards do not divide evenly (a
128256-row embedding over 64 ranks) the last ranks hold less: the stage is listed in `uneven_stages` and the
ranks between the two laid out are the first's (at most one shard row per tensor more than theirs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from gpu_workbench.parallel import recipes
from gpu_workbench.parallel.runtime import compat, memory
from gpu_workbench.parallel.runtime.errors import UserError

# the recipes whose engine is not built by parallelize / the pipeline, and why a dry run cannot lay them out
NOT_COVERED = {
    "zero": "DeepSpeed's engine allocates its flat fp32 partitions on a real device and starts its own "
            "communication backend at setup, which neither the meta device nor the fake process group gives it; "
            "see the recipe's memory formula (wb train ... prints it in summary.json)",
}


@dataclass
class DryRun:
    cfg: object
    dims: object
    n_params: int
    by_rank: list[dict]                       # per rank: params, grads, optimizer, total (bytes)
    collectives: list[list[dict]]             # per rank: one step's collectives
    extra: list[dict] = field(default_factory=list)   # per rank: activations, checkpoint, tp/comm parts
    laid_out: list[int] = field(default_factory=list)  # the ranks actually laid out
    uneven_stages: list[int] = field(default_factory=list)   # stages whose first and last rank differ
    elapsed_s: float = 0.0


def refusal(cfg) -> str | None:
    """Why a dry run cannot cover this config's recipe (one line), or None."""
    recipe = recipes.get(cfg.recipe)
    if cfg.recipe.startswith("zero"):
        return f"--dry-run does not cover recipe={cfg.recipe}: {NOT_COVERED['zero']}"
    if recipe.execution != "spmd":
        return (f"--dry-run does not cover recipe={cfg.recipe}: it starts its own workers ({recipe.execution}), "
                f"not one process per rank")
    return None


def dry_run(cfg, world_size: int) -> DryRun:
    """Lay `cfg` out on `world_size` fake ranks. Refuses (UserError) what a real launch refuses, with the
    same line, and what a dry run cannot cover."""
    began = time.perf_counter()
    dims = recipes.resolve(cfg, world_size)   # the real checks: the same one line as a launch
    why = refusal(cfg)
    if why is not None:
        raise UserError(why)
    if dist.is_initialized():
        raise RuntimeError("dry_run needs this process without a process group (it starts fake ones)")
    results: dict[int, dict] = {}
    uneven: list[int] = []
    for stage in range(dims.pp):
        members = [r for r in range(world_size) if dims.coords(r)["pp"] == stage]
        for rank in dict.fromkeys((members[0], members[-1])):
            results[rank] = lay_out(cfg, dims, rank)
        if results[members[0]]["state"] != results[members[-1]]["state"]:
            uneven.append(stage)   # a shard that does not divide evenly: the ranks between are estimated
    laid_out = sorted(results)
    stage_rep = {dims.coords(r)["pp"]: r for r in reversed(laid_out)}   # the first laid-out rank of each stage
    per_rank = [results.get(r) or results[stage_rep[dims.coords(r)["pp"]]] for r in range(world_size)]
    return DryRun(cfg=cfg, dims=dims, n_params=per_rank[0]["n_params"],
                  by_rank=[p["state"] for p in per_rank], collectives=[p["collectives"] for p in per_rank],
                  extra=[p["extra"] for p in per_rank], laid_out=laid_out, uneven_stages=uneven,
                  elapsed_s=time.perf_counter() - began)


def lay_out(cfg, dims, rank: int) -> dict:
    """One rank: the fake group as `rank`, the model on meta, the recipe's own setup; what it holds."""
    from gpu_workbench.parallel.models.transformer import build, count_params
    from gpu_workbench.parallel.primitives.activations import activation_bytes
    from gpu_workbench.parallel.recipes.base import freeze
    from gpu_workbench.parallel.runtime.distributed import Context
    from gpu_workbench.parallel.tools import dry_collectives

    compat.fake_process_group(rank, dims.world_size)
    try:
        ctx = Context(rank=rank, world_size=dims.world_size, local_rank=0, device=torch.device("meta"), dims=dims)
        with torch.device("meta"):
            model = build(cfg.model)
        n_params = count_params(model)
        freeze(model, cfg.optim.frozen)
        engine = recipes.get(cfg.recipe).setup(model, cfg, ctx)
        after_one_step(engine)
        state = memory.held_bytes(engine.held_tensors())
        extra = {"activations": activation_bytes(cfg, dims, rank, engine),
                 "checkpoint_bytes": checkpoint_bytes(engine),
                 "params_on_rank": engine.params_on_rank(n_params)}
        return {"n_params": n_params, "state": state, "extra": extra,
                "collectives": dry_collectives.step_collectives(engine, cfg, dims, rank)}
    finally:
        dist.destroy_process_group()


def after_one_step(engine) -> None:
    """What the engine holds after its first optimizer step: a gradient per trained parameter, laid out as
    the parameter (a DTensor's local shard), and torch AdamW's state (step, exp_avg, exp_avg_sq: zeros_like
    the parameter, as AdamW's _init_group makes them)."""
    optimizer = engine.optimizer
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            p.grad = torch.zeros_like(p)
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


def checkpoint_bytes(engine) -> int:
    """Bytes of the tensors this rank hands the universal checkpoint (parallel/checkpoint/universal.py): its
    local shards of the model and of AdamW's moments, where it writes (one copy of replicated state)."""
    if not engine.writes_state():
        return 0
    from gpu_workbench.parallel.checkpoint.universal import _universal_names
    from gpu_workbench.parallel.primitives.tensor_parallel import local

    module = engine.state_module()
    named = dict(module.named_parameters(remove_duplicate=False))
    kept = _universal_names(named, engine.cfg.model.tie_embeddings)
    total = 0
    for name in kept:
        p = named[name]
        moments = 2 if p in engine.optimizer.state else 0
        total += local(p).numel() * local(p).element_size() * (1 + moments)
    return total
