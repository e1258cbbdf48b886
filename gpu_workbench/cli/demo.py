"""The whole workbench on this machine: kernel checks, every recipe side by side, the report.

On a CPU the kernels run through Triton's interpreter and the recipes over gloo; on a GPU node the
same command uses the compiled kernels, the GPUs and nccl.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import typer

from gpu_workbench.cli import compare as comparison
from gpu_workbench.cli.kernels_cli import check_table, default_backends, run_checks
from gpu_workbench.cli.paths import output_dir
from gpu_workbench.cli.report import build_report
from gpu_workbench.cli.report_cli import console, print_runs_table

# Long enough for the tiny model to pass tiny.toml's target loss, short enough for 6 minutes on 2 cores.
# ps.staleness only concerns async-ps (bounded-staleness async; 0 would make it synchronous).
DEMO_OVERRIDES = ["steps=80", "checkpoint.every=0", "ps.staleness=2"]


def run(nproc: int = typer.Option(2, "--nproc", help="processes per recipe"),
        out: Path = typer.Option(None, "--out", help="default runs/demo-<time>"),
        kernels_only: bool = typer.Option(False, "--kernels-only", help="only the kernel checks")) -> None:
    """Kernel checks, then every recipe on configs/tiny.toml side by side, then the report."""
    start = time.perf_counter()
    out = output_dir(out or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}", "--out")
    out.mkdir(parents=True, exist_ok=True)
    backends = default_backends()[:1]   # the real kernel code: compiled on a GPU, interpreted on a CPU
    console.rule("kernels")
    rows = run_checks("all", backends)
    console.print(check_table(rows))
    (out / "kernels.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    kernel_failures = sum(not r.passed for r in rows)
    console.print(f"{len(rows) - kernel_failures}/{len(rows)} kernel checks passed ({backends[0]})")
    failed = {}
    if not kernels_only:
        console.rule("recipes")
        available = comparison.available_recipes()
        recipes = [r for r in comparison.DEMO_RECIPES if comparison.split_spec(r)[0] in available]
        config = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"
        done, failed = comparison.run_recipes(recipes, nproc, config, DEMO_OVERRIDES, out, console)
        if done:
            print_runs_table(done)
        report = build_report(done, out, failed) if done else None
    console.print(f"demo finished in {time.perf_counter() - start:.0f}s: {len(rows) - kernel_failures}/{len(rows)} "
                  f"kernel checks passed" + ("" if kernels_only else f", {len(failed)} recipe(s) failed"))
    if not kernels_only and report:
        console.print(f"report: {report}")
    if kernel_failures or failed:
        raise typer.Exit(1)
