"""Run the kernel correctness sweep on this machine's kernel paths and print a one-line summary."""

from __future__ import annotations

import time

from workbench.kernels_cli import check_table, default_backends, run_checks
from workbench.kernels_cli import console as kernels_cli_console


def run() -> None:
    console = kernels_cli_console
    start = time.perf_counter()
    backends = default_backends()
    rows = run_checks("all", backends)
    console.print(check_table(rows))
    failed = sum(not r.passed for r in rows)
    console.print(f"demo: {len(rows) - failed}/{len(rows)} kernel checks passed on backends "
                  f"{', '.join(backends)} in {time.perf_counter() - start:.1f}s")
    if failed:
        raise SystemExit(1)
