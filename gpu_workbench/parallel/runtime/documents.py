"""data.document_mask: the document ids of the micro-batch being run, for attention to read.

The train step (recipes/base.py) sets them around each forward, `with documents.using(ids):`, and
model.attention then calls kernels.document_attention instead of plain causal attention. A context
variable, not a forward argument: the blocks' signatures (tensor-parallel input plans, pipeline stages,
activation checkpointing) stay as they are. The mask therefore holds only where the forward runs inside
that block: recipes whose forward runs elsewhere (pipeline schedules, their own workers), activation
checkpointing's recompute, and ring attention (cp) are refused in one line (`check`).
"""

from __future__ import annotations

import contextlib
import contextvars

from gpu_workbench.parallel.runtime.errors import UserError

_IDS: contextvars.ContextVar = contextvars.ContextVar("wb_document_ids", default=None)


def current():
    """(B, T) int document ids of the running micro-batch, or None."""
    return _IDS.get()


@contextlib.contextmanager
def using(ids):
    token = _IDS.set(ids)
    try:
        yield
    finally:
        _IDS.reset(token)


def check(cfg, recipe) -> None:
    """One line for a layout where the mask would not reach attention."""
    if not cfg.data.document_mask:
        return
    if recipe.execution != "spmd" or recipe.name == "pipeline":
        raise UserError(f"data.document_mask runs under the shared train step (single, ddp, fsdp, zero*, "
                        f"local-sgd), not recipe {recipe.name}")
    if cfg.cp.degree > 1:
        raise UserError("data.document_mask with cp.degree > 1: ring attention takes no document mask; use cp.degree=1")
    if cfg.model.activation_checkpointing != "none":
        raise UserError("data.document_mask with model.activation_checkpointing: the recompute would run "
                        "without the mask; turn one off")
    if cfg.train.compile:
        raise UserError("data.document_mask with train.compile: a compiled block does not read the mask (a "
                        "context variable); turn one off")
