"""The launcher's start decision, handed to its workers, so a run's checkpoints are verified (sha256 of
every file) once, in the launching process, not a second time in rank 0.

    os.environ[ENV] = encode(start, run_dir)      # the launcher, after preflight, before workers start
    fields = launcher_plan(run_dir)               # rank 0 in decide(): the plan's fields, or None: plan afresh

The plan holds while the run directory's complete checkpoints are as the launcher listed them (names and
meta.json times: no verification): a worker restarted after a new checkpoint landed, or a directory changed
in between, plans again. The plan's checkpoint is re-checked against the run at its real world size from
its meta.json (start.py), which is cheap: an elastic job learns its size only in the workers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from gpu_workbench.parallel.checkpoint.listing import complete_checkpoints

ENV = "WB_START_PLAN"


def _listing(run_dir: Path) -> list[list]:
    return [[p.name, (p / "meta.json").stat().st_mtime_ns] for p in complete_checkpoints(run_dir)]


def encode(start, run_dir: Path) -> str:
    return json.dumps({"run_dir": str(Path(run_dir).resolve()), "listing": _listing(Path(run_dir)),
                       "start": asdict(start)})


def launcher_plan(run_dir: Path) -> dict | None:
    """The launcher's Start (its fields) for this run directory if its checkpoints are unchanged since."""
    text = os.environ.get(ENV)
    if not text:
        return None
    try:
        handed = json.loads(text)
        if handed["run_dir"] != str(Path(run_dir).resolve()) or handed["listing"] != _listing(Path(run_dir)):
            return None
        return dict(handed["start"])
    except (ValueError, KeyError, TypeError, OSError):   # not ours, or the directory changed under us
        return None
