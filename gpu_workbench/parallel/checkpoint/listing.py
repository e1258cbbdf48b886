"""The complete checkpoints of a run directory, newest good one first: what resuming, sampling and
`wb checkpoint inspect` look for. A checkpoint is complete when its step folder holds meta.json (written
last); good when it passes manifest.verify."""

from __future__ import annotations

import sys
from pathlib import Path

from gpu_workbench.parallel.checkpoint.manifest import verify


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
            and p.name.split("_")[1].isdigit() and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def scan(run_dir: Path, trusted: tuple = ()) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint that passes every check or None, [(newer damaged one, problem)])."""
    damaged = []
    for path in reversed(complete_checkpoints(run_dir)):
        problem = verify(path, trusted)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def newest_good(run_dir: Path, trusted: tuple = ()) -> Path | None:
    """The newest complete checkpoint that passes every check; damaged ones before it are named and skipped
    (when none is good, the caller says so in its own one line)."""
    good, damaged = scan(run_dir, trusted)
    if good is not None:
        say_skipped(damaged)
    return good


def say_skipped(damaged: list[tuple[Path, str]]) -> None:
    for path, problem in damaged:
        print(f"wb: checkpoint {path} is damaged ({problem}); trying the previous one", file=sys.stderr)
