"""`wb compare` and `wb report`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gpu_workbench.cli import compare as comparison
from gpu_workbench.cli.paths import output_dir
from gpu_workbench.cli.report import build_report, load_run, runs_table
from gpu_workbench.parallel.runtime.errors import UserError

console = Console(width=None if Console().is_terminal else 160)


def print_runs_table(run_dirs: list[Path]) -> None:
    rows = runs_table([load_run(p) for p in run_dirs])
    table = Table(title="recipes side by side")
    for header in rows[0]:
        table.add_column(header)
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)


def compare(overrides: list[str] = typer.Argument(None, help="config overrides for every recipe: key=value"),
            recipes: str = typer.Option(None, "--recipes", help="comma-separated, e.g. ddp,zero2,fsdp (default: all)"),
            nproc: int = typer.Option(2, "--nproc", help="processes per recipe (single always uses 1)"),
            config: Path = typer.Option(Path("configs/tiny.toml"), "--config", help="TOML config for every recipe"),
            out: Path = typer.Option(None, "--out", help="default runs/compare-<time>"),
            timeline: bool = typer.Option(True, help="write each run's trace.json")):
    """Run recipes on the same config, seed, data and global batch; write the report."""
    chosen = comparison.available_recipes(comparison.parse_recipes(recipes))
    if nproc < 1:
        raise UserError(f"--nproc={nproc} must be >= 1")
    out = out or Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    done, failed = comparison.run_recipes(chosen, nproc, config, overrides or [], out, console, timeline)
    if done:
        print_runs_table(done)
        report = build_report(done, out, failed)
        console.print(f"report: {report}")
    if failed or not done:
        raise typer.Exit(1)


def report(run_dirs: list[Path] = typer.Argument(..., help="finished run directories"),
           out: Path = typer.Option(None, "--out", help="default: the first run's parent folder")):
    """Rebuild report.md and its figures from run directories alone (nothing is re-run)."""
    out = output_dir(out or run_dirs[0].parent, "--out")
    path = build_report(run_dirs, out)
    print_runs_table(run_dirs)
    console.print(f"report: {path}")
