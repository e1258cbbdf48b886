"""`wb plan --config C --gpus N --gpu-memory 80GB [--hardware H100|H200|A100|FILE] [--validate]`: the layouts
of a model that fit N GPUs, best first by estimated tokens/s/GPU, each with the command that runs it
(gpu_workbench/parallel/tools/plan/). `--validate` prints the estimate of published runs beside their figures."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from gpu_workbench.parallel.runtime.errors import UserError


def _memory(text: str) -> float:
    """'80GB', '80GiB', '141 GB' -> bytes."""
    found = re.fullmatch(r"\s*([0-9.]+)\s*(GB|GiB|G)?\s*", text, re.IGNORECASE)
    if not found:
        raise UserError(f"--gpu-memory must be like 80GB or 80GiB, got '{text}'")
    unit = (found.group(2) or "GB").lower()
    return float(found.group(1)) * (2**30 if unit == "gib" else 1e9)


def plan(
    overrides: list[str] = typer.Argument(None, help="config overrides: key=value (e.g. global_batch=64)"),
    config: Path = typer.Option(None, "--config", help="TOML model config (e.g. configs/llama-8b.toml)"),
    gpus: int = typer.Option(None, "--gpus", help="GPUs in all"),
    gpu_memory: str = typer.Option("80GB", "--gpu-memory", help="memory of one GPU, e.g. 80GB"),
    hardware_spec: str = typer.Option("H100", "--hardware", help="H100, H200, A100, or a TOML/JSON file"),
    top: int = typer.Option(5, "--top", help="layouts to print"),
    validate: bool = typer.Option(False, "--validate", help="print the estimate beside published runs' figures"),
) -> None:
    """Which layouts fit, and their estimated tokens/s/GPU and MFU."""
    from gpu_workbench.parallel.tools.plan import hardware

    hw = hardware.load(hardware_spec)
    if validate:
        _print_validation()
        if config is None:
            return
    if config is None or gpus is None:
        raise UserError("wb plan needs --config and --gpus (or --validate alone)")
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    _print_plan(str(config), list(overrides or []), gpus, _memory(gpu_memory), hw, top)


def _print_plan(config: str, extra: list[str], gpus: int, memory: float, hw, top: int) -> None:
    from gpu_workbench.parallel.tools.plan.estimate import estimate
    from gpu_workbench.parallel.tools.plan.layouts import candidates

    fits, refused, too_big = candidates(config, extra, gpus, memory)
    ranked = sorted(((estimate(c.cfg, c.dims, hw), c) for c in fits), key=lambda ec: -ec[0].tokens_per_s_per_gpu)
    print(f"plan: {config} on {gpus} x {hw.name} ({memory / 1e9:.0f} GB): {len(fits)} layouts fit, {too_big} do not, "
          f"{refused} refused by the recipes' checks")
    if not ranked:
        print("no layout fits: more GPUs, more memory, or a smaller global_batch / micro_batch")
        return
    for i, (est, cand) in enumerate(ranked[:top], 1):
        used = " x ".join(f"{k} {v}" for k, v in cand.dims.degrees().items() if v > 1) or "1"
        used += f", ep {cand.dims.ep} within dp" if cand.dims.ep > 1 else ""
        print(f"{i}. {cand.cfg.recipe} ({used}), micro_batch {cand.cfg.micro_batch}, checkpointing "
              f"{cand.cfg.model.activation_checkpointing}"
              + (f", {cand.cfg.pp.schedule}" if cand.cfg.recipe == "pipeline" else "")
              + f": {est.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {est.mfu:.0%}, step {est.step_s:.2f} s, "
              f"memory {cand.memory_bytes / 1e9:.1f} GB/GPU")
        parts = ", ".join(f"{k} {v:.3f}" for k, v in est.parts.items() if v > 0)
        print(f"   seconds: {parts}")
        print(f"   wb train --nproc {gpus} --config {config} {' '.join([*extra, *cand.overrides])}")


def _print_validation() -> None:
    from gpu_workbench.parallel.tools.plan.validate import rows

    print(f"{'published run':<62} {'estimate':>10} {'published':>10} {'ratio':>6}  unit")
    for r in rows():
        flag = "" if abs(r["ratio"] - 1) <= 0.25 else "  (outside 25%)"
        print(f"{r['case']:<62} {r['estimate']:>10,.0f} {r['published']:>10,.0f} {r['ratio']:>6.2f}  {r['unit']}{flag}")
        print(f"{'':<4}source: {r['source']}; {r['note']}")
