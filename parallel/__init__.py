"""parallel: model, data, RunConfig, the train loop, recipes and the memory model.

    from parallel import RunConfig, train
    cfg = RunConfig.from_toml("configs/tiny.toml", overrides=["recipe=zero2", "steps=20"])
    result = train(cfg)
"""

from parallel.config import RunConfig


def train(cfg: RunConfig) -> dict:
    """Run `cfg` in the current process group (see parallel/train.py)."""
    from parallel.train import train as _train  # imported on use: keeps `import parallel` light

    return _train(cfg)


__all__ = ["RunConfig", "train"]
