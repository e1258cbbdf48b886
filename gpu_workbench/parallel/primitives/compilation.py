"""train.compile: each transformer block's forward `torch.compile(fullgraph=True)`d, step 4 of `parallelize`
(docs/ARCHITECTURE.md, Parallelize) and of each pipeline stage's blocks.

    compile_blocks(model.blocks, cfg)

It runs after tensor parallelism (the graph is traced over the DTensor parameters, so the tp collectives are in
it) and before the data-parallel wrapper. The block's own `forward` is what is compiled, not its `__call__`:
FSDP's and DDP's hooks stay outside the graph, and the parameters keep their names (no `_orig_mod.`), so
checkpoints do not change. Activation checkpointing (parallel/models/recompute.py) wraps the block's call, so a
checkpointed block runs the compiled forward, and its recompute runs it again.

On a CPU inductor emits C++ (a compiler is needed; g++ here); on a GPU, Triton. The first step pays for the
compilation: the summary's `compile_s` is the first step's time less the median of the others.
Refused (`validate`): ring attention (cp.degree > 1: its ring of send/recv between ranks inside attention
does not trace into one graph), MoE layers (their per-expert token counts go to the host), DeepSpeed ZeRO (its
engine hooks every parameter and owns the forward), and recipes that run the model in workers of their own.
"""

from __future__ import annotations

import torch

from gpu_workbench.parallel.runtime import compat
from gpu_workbench.parallel.runtime.errors import UserError

# Recipes whose model runs in parallelize (or a pipeline stage) and which the compiled-equals-eager test covers
COMPILED_RECIPES = ("single", "ddp", "fsdp", "pipeline")


def validate(cfg) -> None:
    """train.compile: one line where the composition cannot compile."""
    if not cfg.train.compile:
        return
    if cfg.recipe.startswith("zero"):
        raise UserError(f"train.compile with recipe={cfg.recipe}: DeepSpeed's engine hooks every parameter and "
                        f"owns the forward, which torch.compile does not trace; use fsdp (same sharding)")
    if cfg.recipe not in COMPILED_RECIPES:
        raise UserError(f"train.compile with recipe={cfg.recipe}: its workers build their own models outside "
                        f"parallelize; compile runs under {', '.join(COMPILED_RECIPES)}")
    if cfg.cp.degree > 1:
        raise UserError(f"train.compile with cp.degree={cfg.cp.degree}: ring attention passes blocks between "
                        f"ranks inside attention, which does not trace into one graph; use cp.degree=1")
    if cfg.model.moe.experts > 0:
        raise UserError(f"train.compile with model.moe.experts={cfg.model.moe.experts}: the MoE layer sizes its "
                        f"grouped GEMM from each expert's token count on the host, which a fullgraph compile does "
                        f"not trace; use train.compile=false")


def compile_blocks(blocks, cfg) -> None:
    """Compile each block's forward in place (train.compile); nothing when it is off."""
    if not cfg.train.compile:
        return
    for block in blocks:
        block.forward = _settling(torch.compile(block.forward, fullgraph=True))


def _settling(compiled):
    """The compiled forward, its input first settled (runtime/compat.settled: tensor parallelism's embedding
    output may be a pending collective, which the graph must not take as its input)."""
    def forward(x, *args, **kwargs):
        return compiled(compat.settled(x), *args, **kwargs)

    return forward


def step(model, cfg, ctx) -> None:
    """The PER_MODULE_STEPS entry: the model's blocks."""
    compile_blocks(model.blocks, cfg)
