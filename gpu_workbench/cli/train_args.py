"""A job's `wb train` command line, checked without running it: what `wb slurm render --submit` queues.

    check_job(["wb", "train", "--recipe", "fsdp", "stepz=5"], world_size=16)   # UserError: 'stepz'

The same parsing (train_cli.train's options) and the same checks (config, recipe, layout:
recipes.resolve) as `wb train` itself, at the job's world size. A command that is not `wb train` (or
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
        recipes.resolve(train_cli.load_config(p["config"], items), world_size)
    except UserError as mistake:
        raise UserError(f"the job's wb train on {world_size} rank(s): {mistake}") from None
