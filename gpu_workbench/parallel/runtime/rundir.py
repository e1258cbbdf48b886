"""The run directory: where it is (one rule for every recipe and launcher) and its writers: run.json (the
marker, first: marker.py), config.json, metrics.jsonl (one object per optimizer step, and one {"step",
"tokens", "val_loss", "elapsed_s"} per evaluation, after that step), summary.json.

Where: `run_dir` if the config sets it; else `runs/<name>` if it names the run; else
`runs/<recipe>-<YYYYmmdd-HHMMSS>`. Whatever launches several processes resolves it once, before they
start, so every rank writes into the same directory.

Only rank 0 writes. Writes of JSON files are atomic (tmp file, then rename) so a reader never sees
half a file; metrics.jsonl is appended line by line and, on resume, cut back to the resumed step (a torn
last line is dropped: metrics_log.py). A fresh start (checkpoint.resume=false) in a used directory first
moves the old run into previous/<UTC time>/ (previous.py).
"""

from __future__ import annotations

import json
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any


def resolve_run_dir(cfg) -> Path:
    """The run directory of this config, by the rule above (the timestamp is this process's clock)."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path("runs") / (cfg.name or f"{cfg.recipe}-{datetime.now():%Y%m%d-%H%M%S}")


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_rows(run_dir: str | Path) -> list[dict]:
    from gpu_workbench.parallel.runtime.metrics_log import parse

    return parse(run_dir)[0]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The training records of metrics.jsonl, one per logged step."""
    return [m for m in _read_rows(run_dir) if "val_loss" not in m]


def read_evals(run_dir: str | Path) -> list[dict]:
    """The evaluation records of metrics.jsonl: {"step", "val_loss", "elapsed_s"}, after that step."""
    return [m for m in _read_rows(run_dir) if "val_loss" in m]


class RunDir:
    def __init__(self, path: Path, active: bool):
        self.path, self.active = Path(path), active
        if active:
            from gpu_workbench.parallel.runtime import marker

            self.path.mkdir(parents=True, exist_ok=True)
            marker.write(self.path)   # before any other file of the run

    def write_config(self, config: dict, resumed_from_step: int = 0, start: dict | None = None) -> None:
        """config.json: the resolved config, and `segments`, one entry per time the run was started
        (a resume appends the step it resumed from and what changed; a fresh start begins a new list).
        `start`: the checkpoint it started from (checkpoint.start.Start.record: how, path, step, the
        layout that wrote it, whether it was resharded or only its weights taken)."""
        if not self.active:
            return
        from gpu_workbench.parallel.runtime.flat_config import changes

        old = _read_json(self.path / "config.json") if resumed_from_step else None
        segments = list(old.get("segments", [])) if isinstance(old, dict) else []
        before = {k: v for k, v in old.items() if k != "segments"} if isinstance(old, dict) else {}
        from_step = start["step"] if start else resumed_from_step
        segment = {"started": datetime.now().isoformat(timespec="seconds"), "from_step": from_step,
                   "changed": changes(before, config) if before else {}}
        segments.append({**segment, "checkpoint": start} if start else segment)
        write_json(self.path / "config.json", {**config, "segments": segments})

    def start_metrics(self, resume_step: int) -> list[dict]:
        """Keep the records of steps before `resume_step` (a resumed run rewrites the rest); return the
        training ones."""
        kept = [m for m in _read_rows(self.path) if m["step"] < resume_step] if resume_step else []
        if self.active:
            tmp = self.path / "metrics.jsonl.tmp"
            tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
            tmp.replace(self.path / "metrics.jsonl")
        return [m for m in kept if "val_loss" not in m]

    def log(self, record: dict) -> None:
        if self.active:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def write_summary(self, summary, device_name: str | None = None) -> None:
        """`summary`: a RunSummary (parallel/runtime/summary.py). Its provenance is recorded here, for every
        recipe: the commit, versions and machine that produced it, and the digest of config.json."""
        if not self.active:
            return
        if summary.provenance is None:
            from gpu_workbench.parallel.runtime import provenance

            config = _read_json(self.path / "config.json")
            summary.provenance = provenance.collect(config if isinstance(config, dict) else {}, device_name)
        write_json(self.path / "summary.json", summary.to_dict())


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
