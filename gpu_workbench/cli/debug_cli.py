"""`wb debug dump RUN_DIR` (every live rank writes its flight recorder to <run_dir>/flight/rank<R>.json) and
`wb debug hang RUN_DIR` (the dumps lined up; the first operation the ranks disagree on, and a verdict):
gpu_workbench/parallel/flight/."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import typer

from gpu_workbench.parallel.runtime.errors import UserError

app = typer.Typer(no_args_is_help=True, help="Why a run hangs: the flight recorder's dumps.")


@app.command("dump")
def dump(run_dir: Path = typer.Argument(..., help="a run directory whose ranks are running"),
         wait_s: float = typer.Option(10.0, "--wait", help="seconds to wait for the ranks' dumps")) -> None:
    """Ask every rank of a running job to dump its flight recorder (SIGUSR1 and a request file)."""
    from gpu_workbench.parallel.runtime.flight_recorder import FOLDER, REQUEST

    folder = run_dir / FOLDER
    files = folder.glob("rank*.pid") if folder.is_dir() else []
    pids = {int(p.stem.removeprefix("rank")): int(p.read_text()) for p in files}
    if not pids:
        raise UserError(f"{run_dir}: no running ranks recorded in {folder} (is it a run of the shared loop?)")
    asked = time.time()
    (folder / REQUEST).write_text(str(asked))
    for rank, pid in sorted(pids.items()):
        try:
            os.kill(pid, signal.SIGUSR1)
        except (ProcessLookupError, PermissionError):
            print(f"rank {rank} (pid {pid}): not running here")
    deadline = asked + wait_s
    while time.time() < deadline:
        fresh = [r for r in pids if (folder / f"rank{r}.json").exists()
                 and (folder / f"rank{r}.json").stat().st_mtime >= asked]
        if len(fresh) == len(pids):
            break
        time.sleep(0.2)
    for rank in sorted(pids):
        path = folder / f"rank{rank}.json"
        ok = path.exists() and path.stat().st_mtime >= asked
        print(f"rank {rank}: {path if ok else 'no dump within ' + str(wait_s) + ' s'}")


@app.command("hang")
def hang(run_dir: Path = typer.Argument(..., help="a run directory with flight/rank<R>.json dumps")) -> None:
    """Line the ranks' dumps up and name the first operation they disagree on."""
    from gpu_workbench.parallel.tools.flight_analysis import report

    for line in report(run_dir):
        print(line)
