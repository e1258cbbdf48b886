"""Run directories of the recipes that write no checkpoints (async-ps, hogwild): every run of theirs is a
fresh start, so a used run directory is treated as `checkpoint.resume=false` treats it in the train loop.

    summary = afresh.prepare(run_dir, cfg)   # under the run lock, before the recipe writes anything

A finished run rerun with its settings does nothing (its summary returned, nothing in the directory
changed); any other previous run moves into `<run_dir>/previous/<UTC time>/` (previous.py), said in one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gpu_workbench.parallel.loop import rerun
from gpu_workbench.parallel.runtime import previous
from gpu_workbench.parallel.runtime.summary import RunSummary


def prepare(run_dir: Path, cfg) -> RunSummary | None:
    """The finished run's summary when there is nothing to do, else None once the old run is out of the way."""
    run_dir = Path(run_dir)
    if rerun.same_settings(run_dir, cfg):
        print(f"wb: {run_dir} has already finished its {cfg.steps} steps with these settings: nothing to do "
              f"({cfg.recipe} writes no checkpoints: change a setting, or choose another run_dir, to train again)",
              file=sys.stderr)
        return RunSummary.load(run_dir / "summary.json")
    moved = previous.move_aside(run_dir)
    if moved is not None:
        print(f"wb: {cfg.recipe} writes no checkpoints, so it starts afresh: the previous run in {run_dir} moved "
              f"to {moved}", file=sys.stderr)
    return None
