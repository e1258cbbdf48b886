"""The model registry: model.arch -> ArchSpec (models/spec.py), one file per architecture.

    spec = models.get("llama")       # imports models/llama.py on first use; a UserError for an unknown name
    model = build(cfg.model)         # parallel/models/transformer.py: the one place a model is built

Adding an architecture: a file here holding its ArchSpec, and one line below (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import difflib

from gpu_workbench.parallel.models.spec import ArchSpec
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.registry import LazyRegistry

# name -> "module:attribute"
_WHERE = {
    "gpt2": "gpt2:SPEC",
    "llama": "llama:SPEC",
    "qwen2": "qwen2:SPEC",
    "qwen3": "qwen3:SPEC",
    "qwen3_moe": "qwen3_moe:SPEC",
    "mixtral": "mixtral:SPEC",
}

__all__ = ["ARCHS", "ArchSpec", "get"]

ARCHS = LazyRegistry(_WHERE, "gpu_workbench.parallel.models")


def get(arch: str):
    """The ArchSpec called `arch`, or a UserError naming model.arch and the choices."""
    if arch not in ARCHS:
        close = difflib.get_close_matches(arch, list(ARCHS), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"model.arch: unknown architecture '{arch}'{hint}; choose from {', '.join(ARCHS)}")
    return ARCHS[arch]

