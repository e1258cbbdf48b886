"""`[quant] qat`: quantisation-aware training in the train loop (docs/ARCHITECTURE.md, Quantisation accuracy
and QAT). Which layers, where it runs, and what the run summary records.

    names = quantised_layers(model)     # every nn.Linear of the blocks; the head stays float
    record = apply(model, cfg)          # QATLinear in their place (kernels/quant/qat.py), before any wrapper

The head is left in float both here and in `wb quant eval` (parallel/tools/quant_eval.py reads this list): it
shares its weight with the token embedding (model.tie_embeddings), a table that is looked up, not multiplied.
The layers keep nn.Linear's parameters, so every recipe's wrapping, checkpointing and the universal
format see the same model; the per-row scales need the whole weight, which is why it stops at tensor
parallelism (`validate`).
"""

from __future__ import annotations

from torch import nn

from gpu_workbench.kernels.quant.qat import prepare_qat
from gpu_workbench.parallel.runtime.errors import UserError

# Why tp.degree > 1 is refused, per mode: row-parallel layers (attn.proj, mlp.down) hold a K-slice of each row.
TP_REASONS = {
    "w8a16": "the per-output-channel scale is max|W| over a whole row, and row-parallel layers (attn.proj, "
             "mlp.down) split each row over the tp ranks",
    "w4a16": "row-parallel layers (attn.proj, mlp.down) split each row over the tp ranks, so the fake quantiser "
             "would see a K-slice of the groups as a DTensor shard (not implemented)",
    "w8a8": "the per-token activation scale is max|x| over the whole row of x, which row-parallel layers "
            "(attn.proj, mlp.down) receive split over the tp ranks",
}


def quantised_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers QAT and `wb quant eval` quantise: every nn.Linear under `blocks.`."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")]


def validate(cfg, refusal: str | None) -> None:
    """quant.qat != none: the recipe runs it (`refusal`, its Recipe.quant_aware, is None), tensor parallelism
    is off, and quant.group_size divides every quantised layer's in_features."""
    from gpu_workbench.parallel.models.transformer import d_ff

    mode, q = cfg.quant.qat, cfg.quant
    if refusal is not None:
        raise UserError(f"quant.qat={mode} does not work with recipe={cfg.recipe}: {refusal}")
    if cfg.tp.degree > 1:
        raise UserError(f"quant.qat={mode} with tp.degree={cfg.tp.degree}: {TP_REASONS[mode]}; use tp.degree=1")
    if mode != "w4a16" or q.group_size == -1:
        return   # the 8-bit modes are per output channel; -1 is per channel too
    for what, k in (("model.d_model", cfg.model.d_model), ("model.d_ff", d_ff(cfg.model))):
        if k % q.group_size:
            raise UserError(f"quant.group_size={q.group_size} does not divide {what} ({k}), the in_features of "
                            f"some block layers; choose a divisor or -1 (per output channel)")


def apply(model: nn.Module, cfg) -> dict | None:
    """Swap the quantised layers for QATLinear (quant.qat != none); the summary's `qat` record, else None."""
    q = cfg.quant
    if q.qat == "none":
        return None
    group = None if q.group_size == -1 else q.group_size
    names = prepare_qat(model, q.qat, group, quantised_layers(model))
    return {"mode": q.qat, "group_size": q.group_size if q.qat == "w4a16" else None, "layers": len(names),
            "head_quantised": False}
