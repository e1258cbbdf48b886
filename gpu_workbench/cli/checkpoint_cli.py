"""`wb checkpoint inspect|verify|export`: a checkpoint read from its files alone
(parallel/tools/describe_checkpoint.py).
Imports nothing heavy until a command runs: `wb --help` stays torch-free."""

from __future__ import annotations

from pathlib import Path

import typer

from gpu_workbench.parallel.runtime.errors import UserError

app = typer.Typer(no_args_is_help=True, help="Inspect, verify and export checkpoints.")

PATH_HELP = "a run directory (its checkpoints) or one checkpoints/step_* folder"


@app.command("inspect")
def inspect(path: Path = typer.Argument(..., help=PATH_HELP),
            recipe: str = typer.Option(None, "--recipe", help="say what a resume by this recipe would do"),
            nproc: int = typer.Option(None, "--nproc", help="... on this many ranks (default: the writer's)")):
    """Steps, the layout that wrote each checkpoint, sizes, incremental base or delta, soundness, a resume."""
    from gpu_workbench.parallel.tools import describe_checkpoint as describe

    if recipe is not None:
        from gpu_workbench.parallel import recipes

        recipes.get(recipe)   # an unknown name: one line naming --recipe's choices
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc={nproc} must be >= 1")
    for line in describe.inspect(path, recipe, nproc):
        typer.echo(line)


@app.command("verify")
def verify(path: Path = typer.Argument(..., help=PATH_HELP)):
    """Check every file against the manifest (a delta: its base's too) and that state files load; exit 1 if damaged."""
    from gpu_workbench.parallel.tools import describe_checkpoint as describe

    results = describe.verify_all(path)
    for folder, problem in results:
        typer.echo(f"{folder}: {'good' if problem is None else 'damaged: ' + problem}")
    if any(problem for _, problem in results):
        raise typer.Exit(1)


@app.command("export")
def export(path: Path = typer.Argument(..., help=PATH_HELP + " (a run directory: its newest good one)"),
           format: str = typer.Option("safetensors", "--format", help="safetensors (the only one so far)"),
           out: Path = typer.Option(..., "--out", help="the file to write, e.g. model.safetensors"),
           force: bool = typer.Option(False, "--force", help="replace --out if it exists")):
    """The whole model's weights, consolidated from any layout, under the GPT's parameter names."""
    if format != "safetensors":
        raise UserError(f"--format={format}: only safetensors is supported")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; name a file, e.g. {out}/model.safetensors")
    if out.exists() and not force:   # an export is cheap to redo, the file it would replace may not be
        raise UserError(f"--out {out} exists; pass --force to replace it, or name another file")
    from safetensors.torch import save_file

    from gpu_workbench.parallel.tools import describe_checkpoint as describe

    weights, info = describe.export_weights(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=info)
    tmp.replace(out)   # never a half-written file under the asked name
    typer.echo(f"{out}: {len(weights)} tensors, {sum(v.numel() for v in weights.values())} values "
               f"(step {info['step']}, written by {info['written_by']})")
