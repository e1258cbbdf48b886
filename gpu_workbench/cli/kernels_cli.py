"""`wb kernels check | bench | compile`."""

from __future__ import annotations

import ast
import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gpu_workbench.cli.paths import output_file
from gpu_workbench.parallel.runtime.errors import UserError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Check, time and ahead-of-time compile the Triton kernels.")
# Wide enough for the tables when output is piped (CI logs), as on a terminal.
console = Console(width=None if Console().is_terminal else 160)


def registered_kernels() -> list[str]:
    """The names in the kernel registry (KERNELS in kernels/suite/__init__.py), read from its source:
    importing any of gpu_workbench.kernels imports torch, and `wb --help` stays torch-free."""
    source = (Path(__file__).resolve().parents[1] / "kernels" / "suite" / "__init__.py").read_text()
    assignment = next(node for node in ast.parse(source).body
                      if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "KERNELS")
    return list(ast.literal_eval(assignment.value))


KERNEL_HELP = " | ".join([*registered_kernels(), "all"])


def default_backends() -> list[str]:
    from gpu_workbench.kernels.backend import cuda_available

    return ["triton"] if cuda_available() else ["interpret", "torch"]


def selected(selection: str) -> list[str]:
    """The kernel names `selection` ('all' or one name) stands for; a wrong name is the user's mistake."""
    from gpu_workbench.kernels import suite

    try:
        return suite.names(selection)
    except ValueError as mistake:
        raise UserError(str(mistake)) from None


def run_checks(selection: str, backends: list[str], seed: int = 0):
    from gpu_workbench.kernels import suite

    return [row for name in selected(selection) for backend in backends
            for row in suite.suite(name).check(backend, seed)]


def check_table(rows) -> Table:
    table = Table(title="kernel correctness vs float64 reference (relative error)")
    for col in ("kernel", "case", "backend", "dtype", "errors", "tol", "result"):
        table.add_column(col)
    for r in rows:
        errors = " ".join(f"{k}={v:.1e}" for k, v in r.errors.items())
        table.add_row(r.kernel, r.case, r.backend, r.dtype, errors, f"{r.tolerance:.0e}",
                      "[green]pass[/]" if r.passed else "[red]FAIL[/]")
    return table


# What `wb kernels check --backend` accepts: the kernel backends less `auto` (a sweep names what it ran).
CHECK_BACKENDS = ("triton", "interpret", "torch")


def checked_backends(backends: list[str]) -> list[str]:
    """The --backend values, refused before any kernel runs if one is unknown or needs an absent GPU."""
    for backend in backends:
        if backend not in CHECK_BACKENDS:
            raise UserError(f"--backend={backend!r} is not a kernel backend; choose one of {', '.join(CHECK_BACKENDS)}")
    from gpu_workbench.kernels.backend import cuda_available  # imports torch: after the checks that need nothing

    if "triton" in backends and not cuda_available():
        raise UserError("--backend triton compiles the kernels for a CUDA GPU and torch sees none here; use "
                        "--backend interpret (the same Triton source, on the CPU) or --backend torch")
    return backends


def _json_target(path: Path | None) -> Path | None:
    """--json checked before the work runs: a path it cannot write is the user's mistake, told up front."""
    return output_file(path, "--json") if path else None


def _write_json(path: Path | None, rows) -> None:
    if path:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
        except OSError as e:   # e.g. the folder was removed while the kernels ran
            raise UserError(f"--json {path}: cannot write ({e.strerror or e})") from None


@app.command()
def check(kernel: str = typer.Argument("all", help=KERNEL_HELP),
          backend: list[str] = typer.Option(None, "--backend", "-b", help="triton | interpret | torch (repeatable)"),
          seed: int = typer.Option(0, help="random seed of the inputs"),
          json_out: Path = typer.Option(None, "--json", help="also write the rows here")):
    """Correctness sweep against float64 on random odd shapes; exit 1 on any failure."""
    _json_target(json_out)
    rows = run_checks(kernel, checked_backends(backend or default_backends()), seed)
    console.print(check_table(rows))
    _write_json(json_out, rows)
    failed = sum(not r.passed for r in rows)
    console.print(f"{len(rows) - failed} passed, {failed} failed")
    if failed:
        raise typer.Exit(1)


@app.command()
def bench(kernel: str = typer.Argument("all", help=KERNEL_HELP),
          quick: bool = typer.Option(False, help="fewer shapes"),
          json_out: Path = typer.Option(None, "--json", help="also write the rows here")):
    """Time the kernels on this machine's device beside the torch equivalent, in one run."""
    import torch

    from gpu_workbench.kernels import suite
    from gpu_workbench.kernels.suite.common import set_range_factory
    from gpu_workbench.profiling import range as prange

    _json_target(json_out)

    set_range_factory(prange)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [row for name in selected(kernel) for row in suite.suite(name).bench(device, quick)]
    title = torch.cuda.get_device_name() if device == "cuda" else "CPU (torch backend)"
    table = Table(title=f"kernel benchmarks on {title}")
    metric_names = list(dict.fromkeys(k for r in rows for k in r.metrics))
    for col in ("kernel", "case", "dtype", "median ms", "IQR ms", *metric_names):
        table.add_column(col)
    for r in rows:
        table.add_row(r.kernel, r.case, r.dtype, f"{r.ms:.4f}", f"{r.iqr_ms:.4f}" if r.iqr_ms is not None else "",
                      *(f"{r.metrics[m]:.2f}" if m in r.metrics else "" for m in metric_names))
    console.print(table)
    for line in bench_notes(device, metric_names, torch.get_num_threads()):
        console.print(line)
    _write_json(json_out, rows)


def bench_notes(device: str, metric_names: list[str], threads: int) -> list[str]:
    """What the table compares, which way its ratios go, and whether this machine's figures can be trusted."""
    import os

    notes = []
    if any(m.startswith("vs ") for m in metric_names):
        notes.append("vs X = X's median time / ours: above 1 ours is faster.")
    if device == "cpu":
        notes.append("On a CPU both sides run torch code (the Triton kernels need a GPU; the interpreter is a "
                     "correctness tool, not timed): the rows measure the wrappers' overhead, not the kernels.")
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus:
        notes.append(f"warning: load average {load:.1f} on {cpus} CPUs while measuring: other work shares the "
                     f"machine, so these figures are unreliable (compare rows of one run only).")
    if device == "cpu" and threads > max(1, cpus - 1) and load > 0.25 * cpus:
        notes.append(f"warning: {threads} intra-op threads on a busy {cpus}-CPU machine: small ops wait for "
                     f"their threads (OMP_NUM_THREADS=1 gives steadier figures).")
    return notes


def _parse_archs(arch: str) -> tuple[int, ...]:
    from gpu_workbench.kernels.aot import SM_LIMITS

    try:
        archs = tuple(int(a) for a in arch.split(","))
    except ValueError:
        raise UserError(f"--arch={arch!r} must be comma-separated integers such as 80,90") from None
    for a in archs:
        if a not in SM_LIMITS:
            raise UserError(f"--arch {a} is not supported; choose from {sorted(SM_LIMITS)}")
    return archs


def compile_table(results) -> Table:
    """One row per (config, arch); a failing row (compile error, spills, shared memory, missing
    instruction) is red and says why in `note`."""
    import triton

    table = Table(title=f"ahead-of-time compile (PTX + cubin), Triton {triton.__version__}")
    table.add_column("kernel config", no_wrap=True)  # one line per row, so logs can be grepped
    for col in ("sm", "result", "regs", "spill B", "smem B", "warps/SM", "instructions"):
        table.add_column(col, no_wrap=True)
    table.add_column("note", overflow="fold")
    for r in results:
        failure = r.failure
        spills = "?" if r.ok and r.spill_bytes is None else str(r.spill_bytes or 0) if r.ok else ""
        table.add_row(r.spec.label, str(r.arch), "FAIL" if failure else "ok",
                      str(r.registers or "") if r.ok else "", spills, str(r.shared_bytes) if r.ok else "",
                      str(r.warps_per_sm or "") if r.ok else "", " ".join(r.instructions), failure,
                      style="red" if failure else None)
    return table


@app.command("compile")
def compile_(kernel: str = typer.Argument("all", help=KERNEL_HELP),
             arch: str = typer.Option("80,90", help="comma-separated compute capabilities"),
             jobs: int = typer.Option(0, help="worker processes (0: one per CPU)"),
             dump: Path = typer.Option(None, "--dump", help="write TTIR/TTGIR/LLIR/PTX/SASS of every config here"),
             match: list[str] = typer.Option(None, "--match", help="only specs whose label contains this (repeatable)"),
             json_out: Path = typer.Option(None, "--json", help="also write the rows here")):
    """Compile every kernel at every autotune config for GPUs that need not be present; exit 1 if any
    row fails (compile error, register spills, shared memory over the limit, missing instruction)."""
    from gpu_workbench.kernels import suite
    from gpu_workbench.kernels.aot import compile_all

    _json_target(json_out)
    archs = _parse_archs(arch)
    specs = [s for name in selected(kernel) for s in suite.suite(name).compile_specs()
             if not match or any(m in s.label for m in match)]
    if not specs:
        raise UserError(f"--match: no compile spec of {kernel!r} has a label containing any of {match}")
    results = compile_all(specs, archs, jobs or None, dump_dir=dump)
    console.print(compile_table(results))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps([{**asdict(r), "passed": r.passed, "failure": r.failure} for r in results],
                                       indent=1))
    failed = sum(not r.passed for r in results)
    spilling = sum(bool(r.ok and r.spill_bytes) for r in results)
    console.print(f"{len(results) - failed} passed, {failed} failed ({spilling} spilling)"
                  + (f"; IR and SASS in {dump}" if dump else ""))
    if failed:
        raise typer.Exit(1)


if __name__ == "__main__":  # `python -m gpu_workbench.cli.kernels_cli`: the kernel commands without the rest of the CLI
    from gpu_workbench.cli import entry

    entry.run(app, prog_name="wb kernels")   # a user mistake: one line, exit 2, as under `wb kernels`
