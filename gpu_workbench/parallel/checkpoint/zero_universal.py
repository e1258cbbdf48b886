"""The universal checkpoint format (universal.py) for DeepSpeed's ZeRO recipes, through DeepSpeed's
tensor-fragment API: each parameter's full fp32 value and Adam moments are gathered from the flat
partitions by name (collective), rank 0 writes them as plain tensors, and a reader of any layout asks DCP
for the full tensors and scatters them back into its own partitions. Consolidated state: simple, and
for the sizes this workbench trains, cheap.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpu_workbench.parallel.checkpoint import universal

MOMENTS = ("exp_avg", "exp_avg_sq")


def _named(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """(GPT name, parameter); named_parameters lists a tied head once, as tok_emb.weight."""
    return list(engine.raw.named_parameters())


def _inner(engine):
    return engine.module.optimizer.optimizer   # the torch AdamW stepping the flat fp32 partitions


def _step_count(engine) -> torch.Tensor:
    states = [s["step"] for s in _inner(engine).state.values() if "step" in s]
    return torch.as_tensor(states[0] if states else 0, dtype=torch.float32).clone()


def save(engine, path: Path, step: int) -> None:
    """Every rank gathers (collective); rank 0 writes. Collective."""
    import torch.distributed.checkpoint as dcp
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link_moments(engine)
    model, optim, count = {}, {}, _step_count(engine)
    for name, p in _named(engine):
        model[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        optim[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in MOMENTS}
        optim[name]["step"] = count
    dcp.save({"model": model, "optimizer": optim} if engine.ctx.is_main else {},
             checkpoint_id=str(Path(path) / "dcp"))
    extra = universal.trainer_state(engine.module.lr_scheduler, engine.module.optimizer, step, engine.cfg.global_batch)
    torch.save(extra, Path(path) / f"trainer_rank{engine.ctx.rank}.pt")


def _flat_groups(engine) -> list[tuple[int, torch.Tensor]]:
    """(param group index, flat fp32 partition) that the inner AdamW steps. Stage 3 hands each sub-group's
    partition to its group only for the step (deepspeed 0.19's attributes); stages 1/2 keep them there."""
    opt = engine.module.optimizer
    if engine.stage == 3:
        return [(opt.sub_group_to_group_id[i], flat) for i, flat in enumerate(opt.fp32_partitioned_groups_flat)]
    return [(i, flat) for i, g in enumerate(_inner(engine).param_groups) for flat in g["params"]]


def _init_moments(engine) -> None:
    """A fresh AdamW may have no moments to fill yet: one step with zero gradients at learning rate 0 creates
    them and changes no weight (what torch.distributed.checkpoint's set_state_dict does for torch's)."""
    inner = _inner(engine)
    for gid, flat in _flat_groups(engine):
        if MOMENTS[0] in inner.state.get(flat, {}):   # ZeRO 1/2 create them up front
            continue
        group = inner.param_groups[gid]
        saved_params, saved_lr = group["params"], group["lr"]
        group["params"], group["lr"], flat.grad = [flat], 0.0, torch.zeros_like(flat)
        try:
            inner.step()
        finally:
            group["params"], group["lr"], flat.grad = saved_params, saved_lr, None


def _link_moments(engine) -> None:
    """ZeRO 1/2 map each parameter onto its Adam moments once, at the first step, from the state that exists
    then (none yet: torch's AdamW creates its moments later in that step), so the map is made again here.
    Private attributes of DeepSpeed's optimizer (deepspeed 0.19); stage 3 reads the optimizer state itself."""
    if engine.stage < 3:
        opt = engine.module.optimizer
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _set_weight(engine, p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The fp32 master partition and the module's working copy (stage 3: gathered, set, repartitioned)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(p, value.to(p.dtype))
    if engine.stage == 3:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            p.copy_(value)
    else:
        with torch.no_grad():
            p.copy_(value)


def load(engine, path: Path, model_only: bool = False) -> None:
    """Read full tensors (any writer's layout) and scatter them into this rank's partitions. Collective."""
    from deepspeed.utils import safe_set_full_optimizer_state

    shapes = universal.tensor_index(path)
    named = _named(engine)
    request = {"model": {n: torch.empty(shapes[f"model.{n}"][0]) for n, _ in named}}
    if not model_only:
        request["optimizer"] = {n: {k: torch.empty(shapes[f"optimizer.{n}.{k}"][0]) for k in MOMENTS}
                                | {"step": torch.zeros(())} for n, _ in named}
    universal.read_tensors(request, Path(path), no_dist=False)   # each key from the folder that holds it
    for name, p in named:
        _set_weight(engine, p, request["model"][name])
    if model_only:
        return
    inner = _inner(engine)
    _init_moments(engine)
    _link_moments(engine)
    for name, p in named:
        for k in MOMENTS:
            safe_set_full_optimizer_state(p, request["optimizer"][name][k], k)
    count = request["optimizer"][named[0][0]]["step"]
    for state in inner.state.values():
        state["step"] = count.clone()
    universal.restore_trainer_state(path, engine.ctx.rank, engine.module.lr_scheduler, engine.module.optimizer)
