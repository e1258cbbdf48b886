"""parallel: model, data, RunConfig, parallel dimensions, the train loop, recipes and the memory model.

    from gpu_workbench.parallel import RunConfig, train
    cfg = RunConfig.from_toml("configs/tiny.toml", overrides=["recipe=zero2", "steps=20"])
    summary = train(cfg)    # a RunSummary, also written to <run_dir>/summary.json

Layers, bottom up (docs/ARCHITECTURE.md, Layers): runtime/, models/ + config.py, checkpoint/ + data.py,
primitives/ (parallelize, tensor/context/pipeline parallelism), recipes/, loop/ (the trainer), tools/.
DeepSpeed and Ray are imported only by the recipes that use them, when they run; torch only when
something needs it (`train`), so the CLI answers a mistake without the seconds torch's import takes.
"""

from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.runtime.errors import UserError

__all__ = ["RunConfig", "RunSummary", "UserError", "train"]


def __getattr__(name: str):
    if name == "train":
        from gpu_workbench.parallel.loop.trainer import train
        return train
    if name == "RunSummary":
        from gpu_workbench.parallel.runtime.summary import RunSummary
        return RunSummary
    raise AttributeError(f"module 'parallel' has no attribute {name!r}")
