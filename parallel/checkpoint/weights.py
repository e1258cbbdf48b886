"""The unsharded model weights in one checkpoint directory, whichever recipe wrote it, read in one process.

    state = model_weights(Path("runs/x/checkpoints/step_000100"), GPT(cfg.model))   # {name: tensor}

Formats (parallel/checkpoint/__init__.py writes them atomically; each recipe's engine fills them):
  state.pt             single, ddp, local-sgd: the model's state dict under "model"
  dcp/                 fsdp and tensor parallelism: torch.distributed.checkpoint, resharded on load
                       into the unsharded shapes of `model` (no process group needed)
  stage_rank<S>.pt     pipeline: each stage-rank's stages (<k>.<the model's own names>, k its k-th
                       virtual stage), united
  ds/                  DeepSpeed ZeRO: consolidated to fp32 by DeepSpeed's own zero_to_fp32
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from parallel.errors import UserError


def model_weights(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """`model` gives the names and unsharded shapes (its own values are not changed)."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)["model"]
    if (path / "dcp").is_dir():
        return _from_dcp(path / "dcp", model)
    stages = sorted(path.glob("stage_rank*.pt"))
    if stages:
        return _from_stages(path, stages, model)
    if (path / "ds").is_dir():
        return _from_deepspeed(path, model)
    raise UserError(f"{path} holds no model weights in a format this version reads (state.pt, dcp/, "
                    f"stage_rank*.pt, ds/)")


def _from_dcp(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    with warnings.catch_warnings():   # without a process group one process reads it all, as meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=str(path))
    return state


def _from_stages(path: Path, stages: list[Path], model: nn.Module) -> dict[str, torch.Tensor]:
    if any("_tp" in p.name for p in stages):
        raise UserError(f"{path} was written by a pipeline with tp.degree > 1, whose stage files hold tensor "
                        f"shards; sample from its final_model.pt (checkpoint.save_final=true) instead")
    state: dict[str, torch.Tensor] = {}
    for file in stages:
        held = torch.load(file, map_location="cpu", weights_only=True)["model"]
        state.update({name.split(".", 1)[1]: t for name, t in held.items()})   # "0.blocks.3.x" -> "blocks.3.x"
    return _with_tied(state, model)


def _from_deepspeed(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):   # its progress lines, away from a command's output
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="ds")
    return _with_tied(dict(state), model)


def _with_tied(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A tied head stored once (or as a pipeline's last-stage copy): the model's tied names share one value,
    the embedding's (the copy holds the same numbers after every step: parallel/recipes/pipeline.py)."""
    if getattr(model.cfg, "tie_embeddings", False) and "tok_emb.weight" in state:
        state["head.weight"] = state["tok_emb.weight"]
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} of the model's tensors (first: {missing[0]}); "
                        f"it was written for another model")
    return state
