"""`wb`: the workbench's command line. Each command group lives in its own module."""

from __future__ import annotations

import typer

from gpu_workbench.cli import (
    checkpoint_cli,
    cluster_cli,
    data_cli,
    debug_cli,
    demo,
    entry,
    hf_cli,
    kernels_cli,
    plan_cli,
    profile_cli,
    quant_cli,
    report_cli,
    sample_cli,
    train_cli,
)
from gpu_workbench.profiling.rank_wrap import exec_under_tool_if_asked

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="gpu-workbench: Triton kernels, parallelism recipes, profiling harnesses.")
app.add_typer(kernels_cli.app, name="kernels")
app.add_typer(profile_cli.app, name="profile")
app.command("demo", help=demo.__doc__)(demo.run)
app.command("train")(train_cli.train)
app.command("plan")(plan_cli.plan)
app.add_typer(debug_cli.app, name="debug")
app.add_typer(data_cli.app, name="data")
app.add_typer(checkpoint_cli.app, name="checkpoint")
app.add_typer(hf_cli.app, name="hf")
app.add_typer(quant_cli.app, name="quant")
app.add_typer(cluster_cli.launch_app, name="launch")
app.add_typer(cluster_cli.ray_app, name="ray")
app.add_typer(cluster_cli.slurm_app, name="slurm")
app.command("compare")(report_cli.compare)
app.command("report")(report_cli.report)
app.command("sample")(sample_cli.sample)


def main(argv: list[str] | None = None) -> None:
    """Entry point: a user mistake (UserError, UsageError) is one line on stderr and exit code 2; any
    other exception is a bug and keeps its traceback (WB_DEBUG=1 shows one for mistakes too): cli/entry.py."""
    exec_under_tool_if_asked()  # a rank that `wb profile nsys|ncu` selected re-runs itself under the tool
    entry.run(app, argv, prog_name="wb")


if __name__ == "__main__":
    main()
