"""`wb`: the workbench's command line. Each command group lives in its own module."""

from __future__ import annotations

import os
import sys

import typer

from workbench import demo, kernels_cli

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="gpu-workbench: Triton kernels, parallelism recipes, profiling harnesses.")
app.add_typer(kernels_cli.app, name="kernels")
app.command("demo", help=demo.__doc__)(demo.run)


def main(argv: list[str] | None = None) -> None:
    """Entry point: a user mistake is one line on stderr and exit code 2, never a traceback."""
    try:
        # standalone: usage errors print themselves and exit 2; typer.Exit(n) exits with n.
        app(args=argv, prog_name="wb")
    except (ValueError, TypeError) as mistake:
        if os.environ.get("WB_DEBUG"):
            raise
        print(f"wb: error: {mistake}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
