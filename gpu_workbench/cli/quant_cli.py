"""`wb quant eval`: per-mode quantisation accuracy of a trained run (parallel/tools/quant_eval.py), as a table and
optionally JSON. Imports nothing heavy until a command runs: `wb --help` stays torch-free."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gpu_workbench.parallel.runtime.errors import UserError

app = typer.Typer(no_args_is_help=True, help="Quantisation accuracy of trained runs.")
console = Console(width=None if Console().is_terminal else 160)


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.1f}"


def print_table(report: dict, source: str) -> None:
    fp = report["fp"]
    table = Table(title=f"quantisation accuracy, held-out split ({source})")
    for header in ("mode", "loss", "Δ loss", "perplexity", "bytes", "ratio", "SQNR min dB", "SQNR median dB",
                   "worst layer"):
        table.add_column(header, justify="left" if header in ("mode", "worst layer") else "right")
    table.add_row("fp", f"{fp['loss']:.4f}", "", f"{fp['perplexity']:.3f}", f"{fp['bytes']:,}", "1.00", "", "", "")
    for mode, r in report["modes"].items():
        measured = [layer for layer in r["layers"] if layer["sqnr_db"] is not None]
        worst = min(measured, key=lambda layer: layer["sqnr_db"])["name"] if measured else ""
        table.add_row(mode, f"{r['loss']:.4f}", f"{r['loss'] - fp['loss']:+.4f}", f"{r['perplexity']:.3f}",
                      f"{r['bytes']:,}", f"{fp['bytes'] / r['bytes']:.2f}", _db(r["sqnr_db_min"]),
                      _db(r["sqnr_db_median"]), worst)
    console.print(table)


@app.command("eval")
def evaluate(run_dir: Path = typer.Argument(..., help="a run directory written by `wb train`"),
             modes: str = typer.Option("w8a16,w4a16,w8a8", "--modes", help="comma-separated quantisation modes"),
             group_size: int = typer.Option(32, "--group-size", help="w4a16: 32, 64 or 128 along in_features, "
                                                                     "or -1 per output channel"),
             batches: int = typer.Option(None, "--batches", help="held-out global batches (default: the run's "
                                                                 "eval.batches)"),
             json_out: Path = typer.Option(None, "--json", help="also write the report as JSON to this file"),
             device: str = typer.Option("cpu", "--device", help="cpu or cuda")):
    """Quantise every Linear of the blocks (the head stays float) of RUN_DIR's newest checkpoint; per mode:
    per-layer output SQNR on held-out activations, model bytes, held-out loss and perplexity against float."""
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {run_dir} is not a directory")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if json_out is not None and json_out.is_dir():
        raise UserError(f"--json {json_out} is a directory; name a file, e.g. {json_out}/quant_eval.json")
    from gpu_workbench.parallel.tools import quant_eval

    chosen = quant_eval.check_modes([m.strip() for m in modes.split(",") if m.strip()])
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    report, source = quant_eval.evaluate(run_dir, chosen, group_size, batches, device)
    print_table(report, source)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"json: {json_out}")
