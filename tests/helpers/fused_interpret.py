"""Imported by each rank of a torchrun launch as the "llama" architecture (the WB_TEST_ARCHS hook of
tests/helpers/workers/train_runs.py): llama itself, with the model's fused kernels (kernels.rms_norm, rope,
swiglu) routed through Triton's interpreter, while attention and the loss keep their usual backend
(interpreting those too would cost minutes and test nothing of model.fused_kernels). Importing it patches
the `kernels` package of the whole process: only the rank processes import it; the tests' own process
patches within a MonkeyPatch context."""

from __future__ import annotations

from functools import partial

from gpu_workbench import kernels
from gpu_workbench.parallel.models.llama import SPEC  # noqa: F401  (the architecture this module stands for)

FUSED = ("rms_norm", "rope", "swiglu")


def interpreted() -> dict:
    """The fused kernels bound to backend='interpret', by name."""
    return {name: partial(getattr(kernels, name), backend="interpret") for name in FUSED}


for _name, _fn in interpreted().items():
    setattr(kernels, _name, _fn)
