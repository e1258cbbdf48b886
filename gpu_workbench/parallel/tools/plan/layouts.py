"""The layouts `wb plan` considers, and which of them fit: every recipe of the shared loop that composes
(ddp, fsdp, pipeline), tp x cp x pp degrees (x ep for a model with experts), micro-batch, activation
checkpointing and pipeline schedule.
Each candidate is a config with its overrides, checked by the real `recipes.resolve` (what the project cannot
run is dropped there), then by memory: the recipe's model-state formula over the parameters a rank holds
(the dry run checks these bytes against real runs: tests/parallel/tools/test_dry_run.py) plus the activation
estimate (parallel/primitives/activations.py), against the GPU's memory less HEADROOM."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from gpu_workbench.parallel import recipes
from gpu_workbench.parallel.primitives.activations import activation_bytes
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.tools.plan.estimate import params_on_rank

HEADROOM = 0.1   # of the GPU's memory: the CUDA context, NCCL buffers, the allocator's fragmentation
DEGREES = (1, 2, 4, 8)
SCHEDULES = {"1f1b": 1, "interleaved-1f1b": 2, "zero-bubble": 2}   # name -> virtual stages per rank


@dataclass
class Candidate:
    overrides: list[str]
    cfg: object
    dims: object
    state_bytes: int
    activation_bytes: int

    @property
    def memory_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes


def _choices(n_layers: int, gpus: int, experts: bool):
    for recipe, tp, cp, mb, ac in itertools.product(("fsdp", "ddp", "pipeline"), DEGREES, DEGREES, (1, 2, 4),
                                                   ("none", "full")):
        if recipe != "pipeline":
            for ep in DEGREES if experts else (1,):   # resolve refuses what does not divide
                yield [f"recipe={recipe}", f"tp.degree={tp}", f"cp.degree={cp}", f"micro_batch={mb}",
                       f"model.activation_checkpointing={ac}", *([f"ep.degree={ep}"] if ep > 1 else [])]
            continue
        if cp > 1:
            continue
        for pp in (2, 4, 8, 16):
            for schedule, v in SCHEDULES.items():
                if pp * v <= n_layers and pp * tp <= gpus:
                    yield ["recipe=pipeline", f"tp.degree={tp}", f"pp.degree={pp}", f"pp.schedule={schedule}",
                           f"pp.virtual_stages={v}", "pp.microbatches=0", f"micro_batch={mb}",
                           f"model.activation_checkpointing={ac}", "pp.gantt=false"]


def candidates(config, extra: list[str], gpus: int, gpu_memory: float) -> tuple[list[Candidate], int, int]:
    """(the layouts that fit, how many the checks refused, how many did not fit)."""
    from gpu_workbench.parallel import RunConfig

    base = RunConfig.from_toml(config, extra)
    fits, refused, too_big = [], 0, 0
    for over in _choices(base.model.n_layers, gpus, base.model.moe.experts > 0):
        head = ["model.fused_head_loss=false"] if "tp.degree=1" not in over else []
        over = [*over, *head]
        cfg = RunConfig.from_toml(config, [*extra, *over])
        try:
            dims = recipes.resolve(cfg, gpus)
        except UserError:
            refused += 1
            continue
        cand = Candidate(over, cfg, dims, state_bytes(cfg, dims), activation_bytes(cfg, dims, 0))
        if cand.memory_bytes > gpu_memory * (1 - HEADROOM):
            too_big += 1
            continue
        fits.append(cand)
    return fits, refused, too_big


def state_bytes(cfg, dims) -> int:
    """The recipe's model-state bytes per rank (its memory formula; fsdp shards over dp_shard x cp)."""
    model = recipes.get(cfg.recipe).memory_model(cfg)
    shards = dims.dp_shard * dims.cp if cfg.recipe == "fsdp" else dims.dp
    return model.predicted_bytes(params_on_rank(cfg, dims), shards)
