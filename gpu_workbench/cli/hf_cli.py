"""`wb hf inspect PATH`: what a Hugging Face model directory is, and what the project builds from it
(parallel/tools/hf_inspect.py). Imports nothing heavy until a command runs."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Hugging Face model directories: inspect what the project builds.")


@app.command("inspect")
def inspect(path: Path = typer.Argument(..., help="a Hugging Face model directory (config.json, model.safetensors "
                                                  "or a sharded index)")):
    """The architecture, its sizes, the weights, and the [model] section a run started from it gets."""
    from gpu_workbench.parallel.tools import hf_inspect

    for line in hf_inspect.inspect(path):
        typer.echo(line)
