"""A job's `wb train` command line, checked without running it: what `wb slurm render --submit` queues.

    check_job(["wb", "train", "--recipe", "fsdp", "stepz=5"], world_size=16)   # UserError: 'stepz'

The same parsing (train_cli.train's options) and the same checks (config, recipe, layout:
recipes.resolve; the run directory's resume and checkpoint.load_from: preflight) as `wb train` itself, at
the job's world size. A command that is not `wb train` (or
`python -m gpu_workbench train`) is not ours to check.
"""

from __future__ import annotations

import os

from gpu_workbench.parallel.runtime.errors import UserError


def _train_args(command: list[str]) -> list[str] | None:
    """The words after `train` of a `wb train` command, else None."""
    head = [os.path.basename(command[0]), *command[1:3]] if command else []
    if head[:2] == ["wb", "train"]:
        return command[2:]
    if head[:1] and head[0].startswith("python") and command[1:4] == ["-m", "gpu_workbench", "train"]:
        return command[4:]
    return None


def check_job(command: list[str], world_size: int) -> None:
    """Refuse (UserError, naming the job) a `wb train` command that would fail its own checks."""
    import typer
    import typer.main
    from typer._click.exceptions import ClickException  # typer vendors its click

    from gpu_workbench.cli import train_cli
    from gpu_workbench.parallel import recipes

    args = _train_args(command)
    if args is None:
        return
    app = typer.Typer()
    app.command()(train_cli.train)
    try:
        p = typer.main.get_command(app).make_context("wb train", list(args)).params
    except ClickException as mistake:
        raise UserError(f"the job's wb train: {mistake.format_message()}") from None
    items = train_cli.config_items(p["overrides"], p["recipe"], p["deepspeed"], p["run_dir"], p["timeline"])
    try:
        cfg = train_cli.load_config(p["config"], items)
        recipes.resolve(cfg, world_size)
        _check_run_dir(cfg, world_size)
    except UserError as mistake:
        raise UserError(f"the job's wb train on {world_size} rank(s): {mistake}") from None


def _check_run_dir(cfg, world_size: int) -> None:
    """The run directory as the job will find it, where this node sees it (a shared file system): a file,
    a folder of the user's own, a resume or checkpoint.load_from that does not fit (parallel/loop/preflight.py).
    Reads only; a directory this node cannot see is the job's to check."""
    from pathlib import Path

    from gpu_workbench.parallel.loop.preflight import preflight
    from gpu_workbench.parallel.runtime import marker

    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    if run_dir is not None and run_dir.is_file():
        raise UserError(f"run_dir (--run-dir) {run_dir} is a file, not a directory")
    if run_dir is not None:
        marker.check(run_dir)
    if run_dir is not None or cfg.checkpoint.load_from:
        preflight(cfg, world_size)
