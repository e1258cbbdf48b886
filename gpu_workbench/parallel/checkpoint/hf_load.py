"""checkpoint.load_from = "hf:PATH": a Hugging Face model's weights into any recipe's model, any layout. Each
rank asks its own state dict (DTensor shards under fsdp / tp, whole tensors elsewhere, a pipeline's stages)
for the block of every parameter it holds and reads just that block from the safetensors files, through
the architecture's adapter (parallel/models/hf_adapter.py: names, q/k permutation, transposes, tied head).
A tensor whose shape disagrees with config.json is refused in one line before anything is read."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gpu_workbench.parallel import models
from gpu_workbench.parallel.checkpoint.hf_dir import HFWeights
from gpu_workbench.parallel.models.hf_adapter import Source, read
from gpu_workbench.parallel.runtime import compat
from gpu_workbench.parallel.runtime.errors import UserError


def expected_shape(src: Source, shape: list[int]) -> list[int]:
    """The Hugging Face tensor's shape for a parameter of global `shape`."""
    if src.kind == "transposed":
        return shape[::-1]
    if src.kind == "experts":   # each expert's (out, in) weight
        return shape[1:][::-1]
    if src.kind == "column":   # c_attn: (C, 3 x out) weight, (3 x out,) bias
        return [shape[1], 3 * shape[0]] if len(shape) == 2 else [3 * shape[0]]
    return list(shape)


def _check_shape(w: HFWeights, name: str, src: Source, shape: list[int]) -> None:
    hf = src.hf.format(e=src.part - 1) if src.kind == "experts" else src.hf   # the last expert: all are there
    found, want = w.shape(hf), expected_shape(src, shape)
    if found != want:
        raise UserError(f"{w.dir}: tensor {hf} has shape {found}, but config.json says {want} (for {name}); "
                        f"the weights and config.json disagree")


def fill(state: dict[str, torch.Tensor], sources: dict[str, Source], w: HFWeights) -> None:
    """Fill each tensor of `state` (a DTensor: its local shard) in place with its block of the HF weights;
    a tied head (the embedding's own storage) is read once."""
    from torch.distributed.tensor import DTensor

    done = set()
    for name, t in state.items():
        if name not in sources:
            raise UserError(f"the {name} parameter has no Hugging Face tensor in this architecture's adapter")
        src = sources[name]
        _check_shape(w, name, src, list(t.shape))
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.numel() == 0 or (local.data_ptr(), src.hf) in done:   # an empty FSDP shard; a tied head
            continue
        block = read(src, w.slice, compat.local_block(t))
        with torch.no_grad():
            local.copy_(block.view(local.shape))   # converts the dtype in place: no full-size temporary
        done.add((local.data_ptr(), src.hf))


def load_module(module: nn.Module, hf_dir: Path, model_cfg) -> None:
    """Fill `module` (a GPT, an engine's state module) from the Hugging Face directory. Collective only
    where set_model_state_dict is (the layouts' own)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.tensor import DTensor

    sources = models.get(model_cfg.arch).hf.names(model_cfg)
    state = get_model_state_dict(module)
    with HFWeights(Path(hf_dir)) as w:
        fill(state, sources, w)
    if any(isinstance(t, DTensor) for t in state.values()):   # plain tensors are the parameters' own storage
        set_model_state_dict(module, state)


def load(engine, hf_dir: Path) -> None:
    """The engine's model from the Hugging Face directory (its optimizer stays fresh, step 0)."""
    if engine.cfg.recipe.startswith("zero"):
        raise UserError(f"checkpoint.load_from=hf:{hf_dir}: recipe {engine.cfg.recipe} (DeepSpeed) does not "
                        f"read Hugging Face weights yet; use single, ddp, fsdp or pipeline")
    load_module(engine.state_module(), Path(hf_dir), engine.cfg.model)


def check_shapes(hf_dir: Path, model_cfg) -> int:
    """Every tensor the model needs is in the directory with the shape config.json implies (one line
    otherwise), read from the headers alone on a meta-device model; returns the model's parameter count."""
    from gpu_workbench.parallel.models.transformer import build

    with torch.device("meta"):
        model = build(model_cfg)
    sources = models.get(model_cfg.arch).hf.names(model_cfg)
    with HFWeights(Path(hf_dir)) as w:
        for name, t in model.state_dict().items():
            _check_shape(w, name, sources[name], list(t.shape))
    return sum(p.numel() for p in model.parameters())
