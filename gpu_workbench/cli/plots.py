"""Plot helpers shared by `wb report` and the recipes' run directories.

`pipeline_gantt(run_dir)` draws <run_dir>/gantt.png from <run_dir>/pipeline.json (the pipeline recipe
writes both itself; this redraws, e.g. for a report). The drawing lives in `parallel.pipeline.gantt` so that a
pipeline run can draw its chart without importing this package.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpu_workbench.parallel.errors import UserError
from gpu_workbench.parallel.pipeline.gantt import draw_gantt

__all__ = ["draw_gantt", "pipeline_gantt"]


def pipeline_gantt(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    source = run_dir / "pipeline.json"
    if not source.is_file():
        raise UserError(f"{source} not found: only pipeline runs have a schedule to draw")
    return draw_gantt(json.loads(source.read_text()), out or run_dir / "gantt.png")
