"""`wb quant eval`: what post-training quantisation costs a trained run, per mode (docs/ARCHITECTURE.md,
Quantisation accuracy and QAT).

    report = evaluate(run_dir, ["w8a16", "w4a16"], group_size=32, batches=4)
    report["modes"]["w4a16"]["sqnr_db_median"], report["fp"]["loss"]

The newest checkpoint's consolidated weights (parallel/tools/sampling.py: load_model) on the run's held-out split
(parallel/data.py, "val"), micro-batch by micro-batch as the train loop's evaluation runs it, so the fp
loss is the run's own held-out loss. Per mode:
  - per layer, the SQNR of its OUTPUT on the float model's activations: each quantised layer gets the very
    input its float layer saw, so a layer's error is its own, not its predecessors'.
    SQNR = 10 log10(sum ||y||^2 / sum ||y - y_q||^2) over every held-out token.
  - the held-out loss of the whole quantised model (errors compounding), its perplexity, and its bytes
    (every parameter and buffer, a tied weight once; quantised layers as packed integers + scales + zeros).
The layers are those QAT fake-quantises (parallel/models/qat.py: every Linear of the blocks, the head in float).
"""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path

import torch
from torch import nn

from gpu_workbench.kernels.quant import MODES, QuantLinear
from gpu_workbench.parallel.data import Dataset, micro_batches
from gpu_workbench.parallel.models.qat import quantised_layers
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.tools import sampling


def check_modes(modes: list[str]) -> list[str]:
    if not modes:
        raise UserError(f"--modes is empty; choose from {', '.join(MODES)}")
    for mode in modes:
        if mode not in MODES:
            raise UserError(f"--modes: unknown quantisation mode {mode!r}; choose from {', '.join(MODES)}")
    return modes


def check_group_size(model: nn.Module, modes: list[str], group_size: int) -> None:
    """The group size (w4a16) against every quantised layer's in_features, before any work."""
    if "w4a16" not in modes or group_size == -1:
        return
    if group_size not in (32, 64, 128):
        raise UserError(f"--group-size must be 32, 64 or 128 (or -1 for per output channel), got {group_size}")
    for name in quantised_layers(model):
        k = model.get_submodule(name).in_features
        if k % group_size:
            raise UserError(f"--group-size {group_size} does not divide layer {name}'s in_features ({k}); "
                            f"choose a divisor or -1 (per output channel)")


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage once (a tied head and embedding count once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def held_out_batches(cfg, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches of held-out global batches 0 .. batches-1 (the train loop's evaluation's)."""
    cfg.eval.every = cfg.eval.every or 1   # makes Dataset check the bytes file's held-out part holds a window
    data = Dataset(cfg)
    return [data.batch(b, idx, split="val") for b in range(batches)
            for idx in micro_batches(cfg.global_batch, cfg.micro_batch, 0, 1)]


@torch.no_grad()
def mean_loss(model: nn.Module, batches, device) -> float:
    return sum(float(model(x.to(device), y.to(device))) for x, y in batches) / len(batches)


def quantised_copy(model: nn.Module, mode: str, group: int | None) -> nn.Module:
    """A deep copy with every quantised layer a QuantLinear (kernels.quant, the torch backend on CPU)."""
    out = copy.deepcopy(model)
    for name in quantised_layers(out):
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent), attr, QuantLinear.from_linear(out.get_submodule(name), mode, group))
    return out


@torch.no_grad()
def layer_sqnr(model: nn.Module, quantised: dict[str, nn.Module], batches, device) -> dict[str, dict[str, float]]:
    """mode -> layer -> SQNR in dB of the layer's output, on the float model's own inputs to that layer."""
    names = quantised_layers(model)
    signal = {n: 0.0 for n in names}
    noise = {m: {n: 0.0 for n in names} for m in quantised}

    def hook(name):
        def record(module, args, y):
            signal[name] += float(y.double().pow(2).sum())
            for mode, qmodel in quantised.items():
                y_q = qmodel.get_submodule(name)(args[0])
                noise[mode][name] += float((y.double() - y_q.double()).pow(2).sum())
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for x, y in batches:
            model(x.to(device), y.to(device))
    finally:
        for h in handles:
            h.remove()
    return {m: {n: _db(signal[n], noise[m][n]) for n in names} for m in quantised}


def _db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise); None where the quantised output is exact (no noise to measure)."""
    return 10 * math.log10(signal / noise) if noise > 0 else None


def evaluate(run_dir: Path, modes: list[str], group_size: int = 32, batches: int | None = None,
             device: str = "cpu") -> tuple[dict, str]:
    """The report (the JSON of `wb quant eval`) and the checkpoint it read."""
    check_modes(modes)
    model, cfg, source = sampling.load_model(Path(run_dir), device, purpose="evaluate")
    check_group_size(model, modes, group_size)
    if batches is not None and batches < 1:
        raise UserError(f"--batches must be >= 1, got {batches}")
    data = held_out_batches(cfg, batches or cfg.eval.batches)
    group = None if group_size == -1 else group_size
    quantised = {m: quantised_copy(model, m, group).eval() for m in modes}
    sqnr = layer_sqnr(model, quantised, data, device)
    fp_loss = mean_loss(model, data, device)
    report = {"fp": {"loss": fp_loss, "perplexity": math.exp(fp_loss), "bytes": model_bytes(model)}, "modes": {}}
    for mode, qmodel in quantised.items():
        loss, layers = mean_loss(qmodel, data, device), sqnr[mode]
        measured = [v for v in layers.values() if v is not None]
        report["modes"][mode] = {
            "loss": loss, "perplexity": math.exp(loss), "bytes": model_bytes(qmodel),
            "sqnr_db_min": min(measured) if measured else None,
            "sqnr_db_median": statistics.median(measured) if measured else None,
            "layers": [{"name": n, "sqnr_db": v} for n, v in layers.items()]}
    return report, source
