"""One training step's collectives on one rank of a dry run, read off the laid-out engine (parallel/tools/dry_run.py):
what each engine issues per step, with the bytes on the rulers the real run's summary.json uses.

    ddp            all_reduce of the trained gradients once per step (DDP's buckets, or the flat by-hand
                   average over DTensor shards); summary "comm": bytes_per_update = 2 x payload x world size
                   (parallel/comm.py's ruler)
    tensor par.    the TP collectives of tensor_parallel.predicted_step_bytes, the formula a real run checks
                   its measured DTensor collectives against; summary "tp"
    fsdp           per FSDP2 unit: all_gather of its (padded) parameters in each micro-batch's forward, and
                   again in backward when it reshards after forward; one reduce_scatter of its gradients
    pipeline       p2p send/recv of the stage boundary's activations (forward) and their gradients
                   (backward) per micro-batch, the dp all_reduce, the tied-embedding all_reduce, the loss
                   broadcast
    every recipe   the clipping norm's all_reduce (8 bytes) where the gradients are split over ranks
"""

from __future__ import annotations

from gpu_workbench.parallel.primitives import tensor_parallel
from gpu_workbench.parallel.primitives.tensor_parallel import local


def _bytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def _op(op: str, group: str, size: int, count: int, nbytes: int, what: str) -> dict:
    return {"op": op, "group": group, "group_size": size, "count": count, "bytes": nbytes, "what": what}


def step_collectives(engine, cfg, dims, rank: int) -> dict:
    """{"ops": [one step's collectives], "comm": summary's comm part or None, "tp": summary's tp part or None}."""
    ops: list[dict] = []
    parts: dict = {"comm": None, "tp": None}
    experts = getattr(getattr(engine, "layout", None), "experts", None)   # expert parallelism's own reduction
    skip = {id(p) for p in experts.params} if experts is not None else set()
    trained = [p for p in engine.module.parameters() if p.requires_grad and id(p) not in skip]
    if cfg.recipe == "pipeline":
        _pipeline(engine, cfg, dims, ops)
    elif getattr(engine, "layout", None) is not None and engine.layout.sharded:
        _fsdp(engine, cfg, dims, ops, skip)
    elif cfg.recipe == "ddp":
        payload = _bytes(trained)
        group = engine.layout.grad_group_name or "dp_replicate"
        size = engine.layout.grad_group_size if engine.layout.tp else dims.world_size
        if size > 1:
            ops.append(_op("all_reduce", group, size, 1, payload, "gradient average"))
        reduced = payload if size > 1 else 0   # one data-parallel replica: nothing to average
        parts["comm"] = {"bytes_per_update": 2 * reduced * dims.world_size, "comm_ops_per_step": int(size > 1)}
    if dims.tp > 1:
        predicted = _tp_predicted(engine, cfg, dims)
        ops.append(_op("tp collectives", "tp", dims.tp, 1, predicted["bytes"], predicted["formula"]))
        parts["tp"] = {"tp_degree": dims.tp, "tp_bytes_per_step_per_rank_measured": predicted["bytes"]}
    if experts is not None:
        _experts(engine, cfg, dims, experts, ops)
    return {"ops": ops, **parts}


def _experts(engine, cfg, dims, experts, ops: list[dict]) -> None:
    """Expert parallelism: the tokens' all-to-alls (dispatch and combine, forward and backward, each MoE layer
    and micro-batch; dropless, the mean over ranks) and the expert gradients' all-reduce over the ranks
    holding the same experts."""
    from gpu_workbench.parallel.models.moe import MoE
    from gpu_workbench.parallel.primitives import expert_parallel

    layers, mbs = sum(isinstance(m, MoE) for m in engine.layout.model.modules()), cfg.accum_steps(dims.dp)
    total = expert_parallel.predicted_step_bytes(cfg, layers, dims.dp)
    count = (6 if cfg.model.activation_checkpointing != "none" else 4) * layers * mbs   # recompute: the forward's again
    ops.append(_op("all_to_all", "ep", dims.ep, count, total // max(count, 1),
                   "expert parallelism: tokens to their experts and back (forward, backward)"))
    if experts.sharded:   # an fsdp unit of its own per MoE layer, over the ranks holding the same experts
        unit = _bytes(experts.params) * experts.same_size // max(layers, 1)
        gathers = 2 if cfg.fsdp.reshard_after_forward else 1
        ops.append(_op("all_gather", "dp_mod_ep", experts.same_size, gathers * mbs * layers, unit,
                       "fsdp unit of each MoE layer's experts: parameters"))
        ops.append(_op("reduce_scatter", "dp_mod_ep", experts.same_size, layers, unit,
                       "fsdp unit of each MoE layer's experts: gradients"))
    elif experts.same_size > 1:
        ops.append(_op("all_reduce", "dp_mod_ep", experts.same_size, 1, _bytes(experts.params),
                       "expert gradients"))


def _tp_predicted(engine, cfg, dims) -> dict:
    """The TP bytes of one step on this rank: the model's, or the sum over this rank's pipeline stages."""
    if cfg.recipe == "pipeline":
        m = cfg.pp.microbatches
        parts = [tensor_parallel.predicted_step_bytes(cfg, m, (len(s.blocks), s.is_first, s.is_last))
                 for s in engine.stages]
        return {"bytes": sum(p["bytes"] for p in parts), "formula": " + ".join(p["formula"] for p in parts)}
    return tensor_parallel.predicted_step_bytes(cfg, cfg.accum_steps(dims.dp))


def _fsdp(engine, cfg, dims, ops: list[dict], skip: set) -> None:
    """Per unit (each block, then the root): the all-gathers of its parameters, its reduce-scatter; `skip`:
    the expert-parallel parameters fsdp leaves alone."""
    model, shard = engine.layout.model, dims.dp_shard * dims.cp
    mbs = cfg.accum_steps(dims.dp)
    gathers = 2 if cfg.fsdp.reshard_after_forward else 1
    in_blocks = {id(p) for p in model.blocks.parameters()}
    units = [(f"blocks.{i}", [p for p in b.parameters() if id(p) not in skip]) for i, b in enumerate(model.blocks)]
    units.append(("root", [p for p in model.parameters() if id(p) not in in_blocks]))
    group = "dp_shard x cp" if dims.cp > 1 else "dp_shard"
    for name, params in units:
        full = _bytes(params) * shard   # every shard padded to the same size: the gathered unit
        ops.append(_op("all_gather", group, shard, gathers * mbs, full, f"fsdp unit {name} parameters"))
        ops.append(_op("reduce_scatter", group, shard, 1, full, f"fsdp unit {name} gradients"))
    ops.append(_op("all_reduce", "world", dims.world_size, 1, 8, "clipping norm (squares summed)"))


def _pipeline(engine, cfg, dims, ops: list[dict]) -> None:
    m, pp, coord = cfg.pp.microbatches, dims.pp, engine.pp_rank
    tokens = cfg.micro_batch * cfg.model.seq_len // dims.cp
    act = tokens * cfg.model.d_model * 4 // (dims.tp if cfg.tp.sequence_parallel else 1)
    boundaries = sum((not st.is_last) + (not st.is_first) for st in engine.stages)
    if pp > 1:
        ops.append(_op("send/recv", "pp", pp, 2 * m * boundaries, act,
                       "stage-boundary activations (forward) and their gradients (backward)"))
        ops.append(_op("broadcast", "pp", pp, 1, 8, "the last stage's loss"))
        ops.append(_op("all_reduce", "pp", pp, 1, 8, "clipping norm (squares summed over stages)"))
    if dims.dp > 1:
        ops.append(_op("all_reduce", "dp_replicate", dims.dp, 1,
                       _bytes([p for p in engine.module.parameters() if p.grad is not None]), "gradient average"))
    if engine.tie_group is not None:
        stage = engine.stages[0] if coord == 0 else engine.stages[-1]
        weight = stage.tok_emb.weight if coord == 0 else stage.head.weight
        ops.append(_op("all_reduce", "tied pair", 2, 1, _bytes([weight]), "tied embedding gradient sum"))
