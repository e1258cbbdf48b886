"""The dry run (parallel/tools/dry_run.py) against a real run: the same config (the run's config.json) laid out on
the same number of fake ranks holds per rank the bytes the real run measured, and moves per step the TP and
DDP bytes it counted. Called from the test modules whose fixtures already made the real runs, so no launch
is added for it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.runs import summary


def dry_vs_real(run_dir: Path) -> tuple[dict, dict]:
    """(the dry run's --json dict, the real summary flattened) for the real run in `run_dir`."""
    from gpu_workbench.cli.dry_run_cli import to_json
    from gpu_workbench.parallel import RunConfig
    from gpu_workbench.parallel.tools.dry_run import dry_run

    real = summary(run_dir)
    raw = json.loads((Path(run_dir) / "config.json").read_text())
    known = RunConfig().to_dict()
    cfg = RunConfig.from_dict({k: v for k, v in raw.items() if k in known})   # not the run's own records
    return to_json(dry_run(cfg, real["world_size"])), real


def assert_dry_run_matches(run_dir: Path) -> None:
    dry, real = dry_vs_real(run_dir)
    assert dry["model_state_bytes_by_rank"] == real["model_state_bytes_by_rank"], (run_dir, dry, real)
    assert dry["parallel_dims"] == real["parallel_dims"]
    if real.get("bytes_per_update") is not None:   # ddp's gradient all-reduce (comm.py's ruler)
        assert dry["comm"]["bytes_per_update"] == real["bytes_per_update"], (dry["comm"], real["bytes_per_update"])
    if real.get("tp_bytes_per_step_per_rank_measured") is not None:   # DTensor's collectives, counted
        assert dry["tp"]["tp_bytes_per_step_per_rank_measured"] == real["tp_bytes_per_step_per_rank_measured"]
    else:
        assert dry["tp"] is None
