"""`wb sample`: text from a trained run (parallel/tools/sampling.py)."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from gpu_workbench.parallel.runtime.errors import UserError


def sample(run_dir: Path = typer.Argument(..., help="a run directory written by `wb train`"),
           prompt: str = typer.Option(..., "--prompt", help="text (bytes data) or space-separated token ids "
                                                            "(synthetic data)"),
           max_new_tokens: int = typer.Option(None, "--max-new-tokens",
                                              help="default: up to the model's context (model.seq_len)"),
           temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; else softmax(logits / T)"),
           top_k: int = typer.Option(None, "--top-k", help="sample among the k likeliest tokens (default: all)"),
           seed: int = typer.Option(0, "--seed", help="the sampling generator's seed"),
           device: str = typer.Option("cpu", "--device", help="cpu or cuda")):
    """Generate from the newest checkpoint of RUN_DIR (any recipe's) with a KV cache; print the text."""
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {run_dir} is not a directory")
    _check_options(prompt, temperature, top_k)
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    import torch

    from gpu_workbench.parallel.tools import sampling

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    model, cfg, source = sampling.load_model(run_dir, device)
    ids = sampling.encode(cfg, prompt)
    new = cfg.model.seq_len - len(ids) if max_new_tokens is None else max_new_tokens
    sampling.check_length(cfg.model.seq_len, len(ids), new)
    out = sampling.generate(model, torch.tensor([ids], device=device), new, temperature, top_k or 0, seed)
    typer.echo(f"# {source}", err=True)
    typer.echo(sampling.decode(cfg, out[0].tolist()))


def _check_options(prompt: str, temperature: float, top_k: int | None) -> None:
    """Refused before the checkpoint loads: a NaN temperature passes `< 0` and would sample garbage."""
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise UserError(f"--top-k must be >= 1 (leave it out to sample among all tokens), got {top_k}")
    if not prompt.strip():
        raise UserError("--prompt is empty; the model needs at least one token to continue")
