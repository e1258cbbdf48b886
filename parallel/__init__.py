"""parallel: model, data, RunConfig, the train loop, recipes and the memory model.

    from parallel import RunConfig, train
    cfg = RunConfig.from_toml("configs/tiny.toml", overrides=["recipe=zero2", "steps=20"])
    result = train(cfg)     # the summary dict, also written to <run_dir>/summary.json

DeepSpeed is imported only by the zero recipes, when they run.
"""

from parallel.config import RunConfig
from parallel.train import train  # binds the function over the submodule of the same name

__all__ = ["RunConfig", "train"]
