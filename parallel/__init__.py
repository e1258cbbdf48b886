"""parallel: model, data, RunConfig, parallel dimensions, the train loop, recipes and the memory model.

    from parallel import RunConfig, train
    cfg = RunConfig.from_toml("configs/tiny.toml", overrides=["recipe=zero2", "steps=20"])
    summary = train(cfg)    # a RunSummary, also written to <run_dir>/summary.json

Rooms: loop/ (trainer, run directory, summary, faults), recipes/ (one file per parallelism),
pipeline/ (stages, schedule simulator, bubble, Gantt), checkpoint/, ps/ (parameter server).
DeepSpeed and Ray are imported only by the recipes that use them, when they run.
"""

from parallel.config import RunConfig
from parallel.errors import UserError
from parallel.loop.summary import RunSummary
from parallel.loop.trainer import train

__all__ = ["RunConfig", "RunSummary", "UserError", "train"]
