"""Per-step callbacks for launchers that must hear about every step (Ray Train's `ray.train.report`).

    with hooks.on_step(fn):        # fn(record: dict, run_dir: Path), on every rank after each step
        train(cfg)                 # (after that step's checkpoint, if it saved one; an async save is
                                   # published some steps later)

The train loop calls `after_step` once per optimizer step on every rank, so a launcher that needs
each worker to report the same number of times gets exactly that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

_HOOKS: list[Callable[[dict, Path], None]] = []


@contextlib.contextmanager
def on_step(fn: Callable[[dict, Path], None]) -> Iterator[None]:
    _HOOKS.append(fn)
    try:
        yield
    finally:
        _HOOKS.remove(fn)


def after_step(record: dict, run_dir: Path) -> None:
    for fn in list(_HOOKS):
        fn(record, Path(run_dir))
