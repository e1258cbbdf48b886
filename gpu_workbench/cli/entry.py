"""How a command line of the project ends: a user mistake (UserError, UsageError) is one line on stderr,
`wb: error: ...`, and exit code 2; any other exception is a bug and keeps its traceback (WB_DEBUG=1 shows
one for mistakes too). Shared by `wb` (cli/app.py) and `python -m gpu_workbench.cli.kernels_cli`."""

from __future__ import annotations

import os
import sys

import typer

from gpu_workbench.parallel.runtime import worker_errors
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.profiling.errors import UsageError


def run(app: typer.Typer, argv: list[str] | None = None, prog_name: str = "wb") -> None:
    try:
        # standalone: usage errors print themselves and exit 2; typer.Exit(n) exits with n.
        app(args=argv, prog_name=prog_name)
    except (UserError, UsageError) as mistake:
        if os.environ.get("WB_DEBUG"):
            raise
        if worker_errors.record(mistake):   # a rank of `wb train --nproc N`: its launcher prints it, once
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)   # no interpreter teardown: gloo's threads may abort it (distributed.exit_worker)
        print(f"wb: error: {mistake}", file=sys.stderr)
        sys.exit(2)
