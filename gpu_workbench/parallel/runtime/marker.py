"""The run marker, `<run_dir>/run.json`: {"schema": "gpu-workbench run", "version": 1, "created": ...}, the first
file a run writes into its directory. It tells a run directory from any other folder, so that `wb train` never
writes into (or moves aside, or cuts back) files that are not its own.

A directory is accepted when it does not exist, is empty (a lock file aside), holds the marker, holds only what
the project writes before a run starts (a Slurm job's slurm_env.json; checkpoints/ of step_* folders, as a
copied checkpoint to resume from), or predates the marker: its config.json is this project's resolved config
(it has "recipe", "model" and "optim"); the marker is then added by the run. Anything else is refused in one
line, before anything in it is written.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError

NAME = "run.json"
SCHEMA = {"schema": "gpu-workbench run", "version": 1}
IGNORED = {".lock"}   # a stale lock of a run killed before its first write
# written before the run's first file: the Slurm job's record of its allocation (cluster/slurm.py)
BEFORE_THE_RUN = {"slurm_env.json"}


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_marked(run_dir: Path) -> bool:
    marker = _read(Path(run_dir) / NAME)
    return isinstance(marker, dict) and all(marker.get(k) == v for k, v in SCHEMA.items())


def _is_legacy_run(run_dir: Path) -> bool:
    config = _read(Path(run_dir) / "config.json")
    return (isinstance(config, dict) and isinstance(config.get("recipe"), str)
            and isinstance(config.get("model"), dict) and isinstance(config.get("optim"), dict))


def _only_ours(entries: list[Path]) -> bool:
    """Nothing but what this project writes before a run: BEFORE_THE_RUN files and checkpoints/step_*."""
    for entry in entries:
        if entry.name == "checkpoints" and entry.is_dir():
            if any(not p.name.startswith("step_") for p in entry.iterdir()):
                return False
        elif entry.name not in BEFORE_THE_RUN:
            return False
    return True


def check(run_dir: Path) -> None:
    """Refuse (UserError) a directory that holds files and is not a run directory of this project."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or is_marked(run_dir):
        return
    if _only_ours([p for p in run_dir.iterdir() if p.name not in IGNORED]) or _is_legacy_run(run_dir):
        return
    raise UserError(f"run_dir (--run-dir) {run_dir} is not empty and is not a wb run directory (no {NAME}, and "
                    f"no config.json written by wb train); nothing in it was changed: choose an empty or new "
                    f"directory")


def write(run_dir: Path) -> None:
    """Mark `run_dir` as a run directory (kept if already there: `created` is the first run's)."""
    path = Path(run_dir) / NAME
    if is_marked(run_dir):
        return
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tmp = path.with_name(NAME + ".tmp")
    tmp.write_text(json.dumps({**SCHEMA, "created": created}) + "\n")
    tmp.replace(path)
