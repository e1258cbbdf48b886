"""`wb profile nsys | ncu | torch | summarize`: run any `wb` (or other) command under a profiler.

    wb profile nsys --steps 3:5 --ranks 0 -- wb train --recipe ddp --nproc 2
    wb profile ncu --range softmax -- wb kernels bench softmax
    wb profile torch --wait 1 --warmup 1 --active 2 -- wb train --recipe single
    wb profile summarize runs/x/nsys/rank0.nsys-rep
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.profiling import nsight, rank_wrap
from gpu_workbench.profiling.session import parse_schedule, parse_steps

app = typer.Typer(no_args_is_help=True, help="Profile a command with Nsight Systems, Nsight Compute or torch.profiler.")
console = Console(width=None if Console().is_terminal else 160)
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _target(ctx: typer.Context) -> list[str]:
    args = list(ctx.args)
    if not args:
        raise UserError("give the command to profile after --, e.g. wb profile nsys -- wb train --recipe single")
    # `wb ...` runs this very installation, under any tool that re-executes it.
    return [sys.executable, "-m", "gpu_workbench", *args[1:]] if args[0] == "wb" else args


def _out_dir(target: list[str], out: Path | None) -> Path:
    if out is not None:
        return out
    from gpu_workbench.cluster.torchrun import run_dir_of

    named = run_dir_of(target)
    return Path(named) if named else Path("runs") / "profile"


def _ranks(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        ranks = sorted({int(r) for r in text.split(",")})
    except ValueError:
        raise UserError(f"--ranks={text!r} must be comma-separated integers, e.g. 0,1") from None
    if ranks[0] < 0:
        raise UserError(f"--ranks={text!r}: ranks are >= 0")
    return ranks


def _multi_process(target: list[str]) -> bool:
    """Does the command start worker processes (torchrun under `wb train --nproc N`, N > 1)?"""
    for flag in ("--nproc", "--nproc-per-node"):
        if flag in target and target.index(flag) + 1 < len(target):
            return target[target.index(flag) + 1] != "1"
    return any(os.path.basename(part) in ("torchrun",) for part in target[:1])


def _launch(prefix: list[str], target: list[str], env: dict, ranks: list[int] | None, dry_run: bool) -> None:
    env = {**env, **rank_wrap.wrap_env(prefix, ranks, _multi_process(target))}
    shown_env = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    console.print(f"each selected rank ({'all' if ranks is None else ','.join(map(str, ranks))}) runs under:",
                  soft_wrap=True)
    print(shlex.join(prefix + ["<its command>"]))
    print("command:", shown_env, shlex.join(target))
    if dry_run:
        return
    raise typer.Exit(_run(target, {**os.environ, **env}))


def _run(target: list[str], env: dict) -> int:
    """The profiled command's exit code; a command that does not exist is the user's mistake."""
    try:
        return subprocess.run(target, env=env).returncode
    except (FileNotFoundError, PermissionError) as e:
        raise UserError(f"cannot run the command after --: {target[0]} ({e.strerror})") from None


@app.command(context_settings=PASSTHROUGH)
def nsys(ctx: typer.Context,
         steps: str = typer.Option(None, help="capture only steps FIRST:LAST (cudaProfilerStart/Stop in the loop)"),
         ranks: str = typer.Option(None, help="profile only these ranks, e.g. 0,3 (default: all)"),
         out: Path = typer.Option(None, help="reports go to OUT/nsys/rank<R> (default: the run dir)"),
         dry_run: bool = typer.Option(False, "--dry-run", help="print the commands, run nothing")):
    """Nsight Systems, one report per rank."""
    target = _target(ctx)
    env = {}
    if steps:
        parse_steps(steps)
        env["WB_PROFILE_STEPS"] = steps
    prefix = nsight.nsys_prefix(str(_out_dir(target, out) / "nsys" / "rank{rank}"), capture_range=bool(steps))
    if not dry_run:
        nsight.require_tool("nsys")
    _launch(prefix, target, env, _ranks(ranks), dry_run)


@app.command(context_settings=PASSTHROUGH)
def ncu(ctx: typer.Context,
        range_name: str = typer.Option(..., "--range", help="profile kernels inside this wb NVTX range"),
        kernel: str = typer.Option(None, help="only kernels whose name matches this regex"),
        section_set: str = typer.Option("full", "--set", help="ncu section set"),
        ranks: str = typer.Option(None, help="profile only these ranks (default: all)"),
        out: Path = typer.Option(None, help="reports go to OUT/ncu/rank<R>"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the commands, run nothing")):
    """Nsight Compute on the kernels of one NVTX range."""
    target = _target(ctx)
    prefix = nsight.ncu_prefix(str(_out_dir(target, out) / "ncu" / "rank{rank}"), range_name, kernel, section_set)
    if not dry_run:
        nsight.require_tool("ncu")
    _launch(prefix, target, {}, _ranks(ranks), dry_run)


@app.command("torch", context_settings=PASSTHROUGH)
def torch_(ctx: typer.Context,
           wait: int = typer.Option(1, help="steps skipped before profiling"),
           warmup: int = typer.Option(1, help="steps profiled but discarded"),
           active: int = typer.Option(2, help="steps recorded"),
           ranks: str = typer.Option(None, "--ranks", help="profile only these ranks, e.g. 0,3 (default: all)"),
           out: Path = typer.Option(None, "--out", help="the traces' folder (default <run dir>/torch_profile)"),
           dry_run: bool = typer.Option(False, "--dry-run", help="print the command, run nothing")):
    """torch.profiler with a schedule, one cycle: a trace and a key_averages table per profiled rank."""
    target = _target(ctx)
    schedule = f"{wait},{warmup},{active}"
    parse_schedule(schedule)
    env = {"WB_TORCH_PROFILE": schedule}
    selected = _ranks(ranks)
    if selected is not None:
        env["WB_TORCH_PROFILE_RANKS"] = ",".join(map(str, selected))
    if out is not None:
        env["WB_TORCH_PROFILE_OUT"] = str(out.resolve())
    print("command:", " ".join(f"{k}={v}" for k, v in env.items()), shlex.join(target))
    if dry_run:
        return
    raise typer.Exit(_run(target, {**os.environ, **env}))


@app.command()
def summarize(report: Path = typer.Argument(..., help="a .nsys-rep, or the .sqlite nsys export wrote")):
    """Per NVTX range: calls, CPU time, GPU kernel time launched inside it."""
    rows = nsight.summarize(report)
    table = Table(title=f"NVTX ranges in {report.name}")
    for col in ("range", "calls", "CPU ms", "GPU kernel ms", "kernels"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["range"], str(r["calls"]), f"{r['cpu_ms']:.3f}", f"{r['gpu_kernel_ms']:.3f}", str(r["kernels"]))
    console.print(table)


@app.command()
def analyze(run_dir: Path = typer.Argument(..., help="a run directory trained with --timeline (its trace.json)"),
            json_out: Path = typer.Option(None, "--json", help="also write the analysis as JSON here")):
    """Per rank: busy (compute), communication, exposed (non-overlapped) communication and idle time per
    step, from the run's host timeline; and each step's straggler (profiling/analyze.py)."""
    import json

    from gpu_workbench.profiling.analyze import analyze_run

    result = analyze_run(run_dir)
    table = Table(title=f"{run_dir}: median ms per step, per rank")
    for col in ("rank", "step", "busy", "comm", "exposed comm", "idle", "straggler in"):
        table.add_column(col, justify="right")
    stragglers = [s["straggler"] for s in result["steps"]]
    for rank, r in result["ranks"].items():
        table.add_row(str(rank), *(f"{r[k]:.2f}" for k in ("step_ms", "busy_ms", "comm_ms", "exposed_ms", "idle_ms")),
                      f"{stragglers.count(rank)}/{len(stragglers)} steps")
    console.print(table)
    worst = max(result["steps"], key=lambda s: s["waited_ms"])
    console.print(f"longest wait: step {worst['step']}, the other ranks waited up to {worst['waited_ms']:.2f} ms "
                  f"for rank {worst['straggler']} (straggler: the rank with the least exposed communication)")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))
