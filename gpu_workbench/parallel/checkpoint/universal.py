"""The universal checkpoint format of the torch recipes (single, ddp, fsdp, the TP compositions, pipeline,
local-sgd; zero1-3 through zero_universal.py): one layout-free state that any of them resumes, on any
world size.

    step_000004/
      dcp/                 torch.distributed.checkpoint: the model's and AdamW's tensors, keyed by the GPT's
                           own (unsharded) names: model.<name>, optimizer.<name>.exp_avg|exp_avg_sq|step
      trainer_rank<r>.pt   per rank: scheduler, learning rates, data position, RNG state

An incremental checkpoint's dcp/ holds only what changed; meta.json's tensor map names the folder of every
other key (incremental.py), and every read here goes through it.

Each rank hands DCP its local shards (DTensors under fsdp / tp, plain tensors elsewhere) under the GPT's
names; DCP records global shapes and offsets, so a reader with another layout asks for its own shards and
gets them resharded. Only the ranks that `writes` (one copy of replicated state) contribute tensors.
A tied embedding is stored once, as tok_emb.weight: a tied GPT's head.weight is the same tensor, and a
pipeline's last stage holds an untied copy of it (kept equal by the tied-gradient sum), which it writes
and reads under tok_emb.weight. Optimizer hyperparameters are not stored: the reader's config rebuilds them
(its learning rates are set from the saved ones).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FORMAT = "universal"
TIED = ("head.weight", "tok_emb.weight")   # (the head's name, the one name a tied embedding is stored under)


def _universal_names(names, tied: bool) -> dict[str, str]:
    """{this rank's name: the name in the checkpoint}; a tied head maps onto the embedding, and where both
    are on this rank (the same tensor) only the embedding is kept."""
    names = list(names)
    out = {n: n for n in names}
    if tied and TIED[0] in out:
        del out[TIED[0]]
        if TIED[1] not in out:
            out[TIED[0]] = TIED[1]
    return out


def _renamed(sd: dict, tied: bool) -> dict:
    return {new: sd[old] for old, new in _universal_names(sd, tied).items()}


def _state(module: nn.Module, optimizer, tied: bool, with_optimizer: bool) -> tuple[dict, dict, dict | None]:
    """(what DCP writes or fills in place, the model state dict, the optimizer state dict) of this rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not with_optimizer:   # no optimizer call at all: get_state_dict would give a fresh AdamW a step
        model_sd = get_model_state_dict(module)
        return {"model": _renamed(model_sd, tied)}, model_sd, None
    model_sd, optim_sd = get_state_dict(module, optimizer)
    request = {"model": _renamed(model_sd, tied), "optimizer": _renamed(optim_sd["state"], tied)}
    return request, model_sd, optim_sd


def _alone() -> bool:
    """No process group (single): DCP reads and writes on this process only."""
    import torch.distributed as dist

    return not dist.is_initialized()


def trainer_state(scheduler, optimizer, step: int, global_batch: int, scaler=None) -> dict:
    """What trainer_rank<r>.pt holds: the schedule, the rates, the data position, this rank's RNG, and under
    precision=fp16 the loss scaler (its scale and clean-step count: a resumed run skips the steps the
    uninterrupted one would)."""
    # None: a --deepspeed config's own scheduler, which DeepSpeed steps and this format does not hold
    state = {"scheduler": scheduler.state_dict() if scheduler is not None else None,
             "loss_scaler": scaler.state_dict() if scaler is not None else None,
             "lrs": [g["lr"] for g in optimizer.param_groups],
             "data": {"next_step": step, "samples_seen": step * global_batch}, "rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def save(engine, path: Path, step: int, previous: dict | None = None):
    """Write this rank's part of the universal checkpoint into `path` (the step_N.tmp directory). Collective.
    `previous`: the last checkpoint's meta.json (incremental saves build on its tensor map). Returns the
    writer.Written that checkpoint.publish completes."""
    from gpu_workbench.parallel.checkpoint import incremental, writer

    opts = engine.cfg.checkpoint
    request, _, _ = _state(engine.state_module(), engine.optimizer, engine.cfg.model.tie_embeddings, True)
    request = request if engine.writes_state() else {}
    written = writer.Written()
    if opts.incremental:   # only what changed since `previous`; a base every full_every saves
        full = incremental.is_full(previous, opts.full_every)
        name = Path(path).name.removesuffix(".tmp")
        keys, written.tensors = incremental.plan(incremental.key_hashes(request), (previous or {}).get("tensors"),
                                                 name, full)
        request = incremental.select(request, keys)
        written.chain = 0 if full else int(previous.get("chain", 0)) + 1
    delay = engine.cfg.fault.checkpoint_write_delay_s
    written.pending = writer.write(request, Path(path) / "dcp", opts.async_save, delay)
    extra = trainer_state(engine.scheduler, engine.optimizer, step, engine.cfg.global_batch, engine.scaler)
    torch.save(extra, Path(path) / f"trainer_rank{engine.ctx.rank}.pt")
    return written


def read_tensors(request: dict, path: Path, no_dist: bool) -> None:
    """Fill `request` in place from checkpoint `path`: each key from the folder its tensor map names (the
    folder itself for a checkpoint without a map), one DCP read per folder."""
    import torch.distributed.checkpoint as dcp

    from gpu_workbench.parallel.checkpoint import incremental
    from gpu_workbench.parallel.checkpoint.manifest import read_meta
    from gpu_workbench.parallel.checkpoint.writer import dcp_quiet

    meta, _ = read_meta(path)
    for folder, keys in sorted(incremental.folders_of(meta or {}, Path(path)).items()):
        part = incremental.select(request, keys) if keys else request
        with dcp_quiet():   # every rank reads every folder, its part possibly empty: dcp.load is collective
            dcp.load(part, checkpoint_id=str(folder / "dcp"), no_dist=no_dist)


def _trainer_file(path: Path, rank: int) -> Path:
    """This rank's trainer state; rank 0's when the writer had fewer ranks (the RNG streams restart from it)."""
    own = Path(path) / f"trainer_rank{rank}.pt"
    return own if own.is_file() else Path(path) / "trainer_rank0.pt"


def load(engine, path: Path, model_only: bool = False) -> None:
    """Fill the engine's own shards from the universal checkpoint at `path`, whatever layout wrote it.
    model_only: the weights alone (the optimizer and schedule stay fresh). Collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    module, optimizer = engine.state_module(), engine.optimizer
    request, model_sd, optim_sd = _state(module, optimizer, engine.cfg.model.tie_embeddings, not model_only)
    # in place: model_sd / optim_sd share the request's tensors
    read_tensors(request, Path(path), _alone())
    if engine.cfg.model.tie_embeddings and TIED[0] in model_sd and TIED[1] in model_sd:
        model_sd[TIED[0]] = model_sd[TIED[1]]   # one tensor: a stale head entry must not be loaded after it
    if model_only:
        set_model_state_dict(module, model_sd)
        return
    set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    restore_trainer_state(path, engine.ctx.rank, engine.scheduler, optimizer, engine.scaler)


def restore_trainer_state(path: Path, rank: int, scheduler, optimizer, scaler=None) -> None:
    extra = torch.load(_trainer_file(path, rank), map_location="cpu", weights_only=True)
    if scheduler is not None and extra["scheduler"] is not None:
        scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra.get("loss_scaler"):   # absent: written by a run without fp16
        scaler.load_state_dict(extra["loss_scaler"])
    for group, lr in zip(optimizer.param_groups, extra["lrs"], strict=True):
        group["lr"] = lr
    torch.set_rng_state(extra["rng"])
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["cuda_rng"])


def tensor_index(path: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    """{name in the checkpoint: (global shape, dtype)} from DCP's metadata (of every folder an incremental
    checkpoint reads from), without loading anything."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from gpu_workbench.parallel.checkpoint import incremental
    from gpu_workbench.parallel.checkpoint.manifest import read_meta

    meta, _ = read_meta(path)
    out = {}
    for folder, keys in incremental.folders_of(meta or {}, Path(path)).items():
        saved = FileSystemReader(str(folder / "dcp")).read_metadata().state_dict_metadata
        out.update({k: (list(v.size), v.properties.dtype) for k, v in saved.items()
                    if isinstance(v, TensorStorageMetadata) and (not keys or k in keys)})
    return out


def consolidated_weights(path: Path, tied: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights under the GPT's state-dict names, read on one process (no process group)."""
    want = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in tensor_index(path).items()
            if k.startswith("model.")}
    read_tensors({"model": {k[len("model."):]: v for k, v in want.items()}}, Path(path), no_dist=True)
    weights = {k[len("model."):]: v for k, v in want.items()}
    if tied and TIED[1] in weights:   # the GPT's state dict names the tied head too
        weights[TIED[0]] = weights[TIED[1]].clone()
    return weights
