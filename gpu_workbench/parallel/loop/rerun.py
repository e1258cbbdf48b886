"""What a resume finds in its run directory, decided before anything there is written: a finished run
rerun with the same settings (nothing to do: nothing changes, not even summary.json), and a metrics.jsonl
that can be read back (metrics_log.py). Rank 0 reads, every rank gets its answer (collective).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gpu_workbench.parallel.runtime import metrics_log
from gpu_workbench.parallel.runtime.distributed import broadcast
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.flat_config import changes


def _finished(run_dir: Path, cfg, begin) -> bool:
    """Resumed at its last step, with a summary, and no setting but run_dir differs from config.json's."""
    if begin.step != cfg.steps or not (run_dir / "summary.json").is_file():
        return False
    try:
        old = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(old, dict):
        return False
    now = json.loads(json.dumps(cfg.to_dict(), default=str))   # as config.json holds it
    # where the directory is (it may have been moved) is not a setting of the run
    return not changes({k: v for k, v in old.items() if k not in ("segments", "run_dir")},
                       {k: v for k, v in now.items() if k != "run_dir"})


def _look(run_dir: Path, cfg, begin) -> tuple[str | None, str | None, bool]:
    """(refusal, note to print, finished) on rank 0."""
    if _finished(run_dir, cfg, begin):
        return None, (f"{run_dir} has already finished its {cfg.steps} steps with these settings: nothing to do "
                      f"(raise steps to train further)"), True
    try:
        return None, metrics_log.check(run_dir), False
    except UserError as refusal:
        return str(refusal), None, False


def check(run_dir: Path, cfg, begin, is_main: bool) -> bool:
    """True if the run has nothing to do; a UserError (every rank) if its metrics.jsonl is damaged."""
    answer = _look(Path(run_dir), cfg, begin) if is_main and begin.how == "resume" else (None, None, False)
    problem, note, finished = broadcast(answer)
    if problem:
        raise UserError(problem)
    if note and is_main:
        print(f"wb: {note}", file=sys.stderr)
    return finished
