"""One layout's step time on given hardware, from FLOPs, bytes and the pipeline simulator (an estimate: no GPU
runs it). For a resolved config (its ParallelDims `dims`) on `hw`:

    compute     model FLOPs per GPU (6 per parameter and token, plus causal attention; full activation
                checkpointing adds one forward of the blocks, selective half their matmuls) / (peak x EFFICIENCY)
    memory      non-matmul passes over the saved activations (4 per byte: written, read, its gradient
                written and read) and AdamW's 28 bytes per parameter of the rank's shard, over HBM bandwidth
    tp          tensor_parallel.predicted_step_bytes (16-bit activations under bf16) as ring all-reduces on
                the tp group, not overlapped (they sit between a layer's matmuls)
    cp          ring attention's K/V passes, hidden behind the attention's own FLOPs where they are shorter
    ep          the tokens' all-to-alls (expert_parallel.predicted_step_bytes, 16-bit under bf16) on the ep
                group, not overlapped (the experts wait for their tokens)
    fsdp / ddp  all-gathers (forward, and backward when resharding) and one reduce-scatter of the rank's fp32
                parameters (this project's FSDP2 gathers fp32); ddp's all-reduce: overlapped with compute, the
                excess and one unit's worth exposed
    pipeline    the simulator's bubble on equal stages (backward 2x forward, 3x with recomputation) stretches
                compute, tp and memory; stage-boundary sends added; its dp all-reduce after the schedule
A group's bandwidth is the node's (NVLink) when the group's ranks lie in one node (tp fastest, then cp,
dp_shard, dp_replicate, pp: parallel/dims.py), else the GPU's network share.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu_workbench.parallel import models
from gpu_workbench.parallel.primitives import tensor_parallel
from gpu_workbench.parallel.primitives.activations import per_block_token
from gpu_workbench.parallel.runtime.dims import ORDER

# The share of the dense peak a transformer's matmuls reach end to end: the one assumption the compute time
# rests on (published MFU of well-tuned bf16 training is 35-55%); chosen, not fitted to the validation runs.
EFFICIENCY = 0.5


@dataclass
class Estimate:
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    parts: dict   # seconds per step: compute, memory, tp, cp, dp, pp_p2p, bubble


def _bandwidth(dims, name: str, hw) -> float:
    """Bytes/s one rank gets in a group along dimension `name`."""
    stride = 1
    for other in reversed(ORDER):
        if other == name:
            break
        stride *= getattr(dims, other)
    return _spanning(getattr(dims, name) * stride, hw)


def _spanning(ranks: int, hw) -> float:
    """Bytes/s one rank gets in a group whose members lie within `ranks` consecutive ranks."""
    return (hw.intra_node_gb_s if ranks <= hw.gpus_per_node else hw.inter_node_gb_s) * 1e9


def _element_bytes(cfg) -> int:
    """Bytes of one activation value on the wire: 4 under fp32, else 2 (bf16, fp16, and fp8's bf16 around its
    float8 linears)."""
    return 4 if cfg.precision == "fp32" else 2


def _ring(n: int, nbytes: float, bw: float, all_reduce: bool = False) -> float:
    return 0.0 if n <= 1 else (2 if all_reduce else 1) * (n - 1) / n * nbytes / bw


def compute_seconds(cfg, dims, hw) -> tuple[float, float]:
    """(matmul seconds per step on one GPU, model FLOPs per token)."""
    m = cfg.model
    spec = models.get(m.arch)
    per_token = spec.flops_per_token(m)
    work = per_token + recomputed_flops_per_token(m)
    tokens_per_gpu = cfg.global_batch * m.seq_len / dims.world_size
    return tokens_per_gpu * work / (hw.peak_bf16_flops * EFFICIENCY), per_token


def recomputed_flops_per_token(m) -> float:
    """The forward FLOPs backward runs again: "full" the blocks' whole forward; "selective" (models/recompute.py)
    keeps attention's and every other matmul's output, so half the blocks' matmuls run again."""
    spec = models.get(m.arch)
    matmuls = 2 * m.n_layers * (spec.sharded_per_block(m) + spec.replicated_per_block(m))
    attention = 2 * m.n_layers * m.seq_len * m.d_model
    return {"full": matmuls + attention, "selective": matmuls / 2}.get(m.activation_checkpointing, 0.0)


def other_ranks_experts(cfg, dims) -> int:
    """The routed experts' parameters that the rest of a rank's ep group holds (0 without expert parallelism)."""
    m = cfg.model
    spec = models.get(m.arch)
    routed = spec.moe_blocks(m) * m.moe.experts * spec.expert_params(m)
    return routed - routed // dims.ep


def params_on_rank(cfg, dims) -> int:
    """Parameters one rank holds before data-parallel sharding: Ψs/T + Ψr, of the biggest stage under pp. With
    expert parallelism under ddp, the routed experts split over ep (fsdp shards them over all dp ranks either way:
    dp / ep ranks x ep)."""
    m = cfg.model
    n = models.get(m.arch).n_params(m)
    if dims.pp == 1:
        held = tensor_parallel.params_per_rank(m, n, dims.tp)
        return held - (other_ranks_experts(cfg, dims) if cfg.recipe != "fsdp" else 0)
    per = -(-m.n_layers // dims.pp)
    return max(tensor_parallel.stage_params_per_rank(m, per, True, False, dims.tp),
               tensor_parallel.stage_params_per_rank(m, per, False, True, dims.tp))


def estimate(cfg, dims, hw) -> Estimate:
    m, parts = cfg.model, {}
    compute, per_token = compute_seconds(cfg, dims, hw)
    parts["compute"] = compute
    held = params_on_rank(cfg, dims)
    shard = dims.dp_shard * dims.cp if cfg.recipe == "fsdp" else 1
    mbs = cfg.accum_steps(dims.dp)
    tokens = cfg.micro_batch * m.seq_len // dims.cp
    layers = m.n_layers // dims.pp
    block, _ = per_block_token(cfg, dims.tp, cfg.tp.sequence_parallel)
    parts["memory"] = (4 * block * tokens * layers * mbs + 28 * held / shard) / (hw.hbm_gb_s * 1e9)
    e = _element_bytes(cfg)
    tp_bytes = 0.0
    if dims.tp > 1:
        stage = None if dims.pp == 1 else (layers, True, True)
        micro = mbs if dims.pp == 1 else cfg.pp.microbatches
        tp_bytes = tensor_parallel.predicted_step_bytes(cfg, micro, stage)["bytes"]
    parts["tp"] = _ring(dims.tp, tp_bytes * e / 4, _bandwidth(dims, "tp", hw), all_reduce=True)
    parts["cp"] = _cp_seconds(cfg, dims, hw, compute)
    parts["ep"] = _ep_seconds(cfg, dims, hw)
    # fsdp gathers (and reduces) only its ep group's share of the experts
    gathered = held - (other_ranks_experts(cfg, dims) if cfg.recipe == "fsdp" else 0)
    parts["dp"] = _dp_seconds(cfg, dims, hw, gathered * 4, compute, mbs)
    parts["pp_p2p"] = 0.0
    bubble = 0.0
    if dims.pp > 1:
        from gpu_workbench.parallel.primitives.pipeline.schedule import simulate

        bwd = 2.0 + recomputed_flops_per_token(m) / per_token * 3   # per_token: forward and backward (3 forwards)
        sim = simulate(cfg.pp.schedule, dims.pp, cfg.pp.microbatches, cfg.pp.virtual_stages, 1.0, bwd)
        bubble = sim.bubble_fraction
        act = tokens * m.d_model * e
        parts["pp_p2p"] = 2 * cfg.pp.microbatches * cfg.pp.virtual_stages * act / _bandwidth(dims, "pp", hw)
    busy = parts["compute"] + parts["memory"] + parts["tp"] + parts["cp"] + parts["ep"]
    parts["bubble"] = busy * bubble / (1 - bubble)
    step = busy + parts["bubble"] + parts["dp"] + parts["pp_p2p"]
    tps = cfg.global_batch * m.seq_len / step / dims.world_size
    return Estimate(step, tps, tps * per_token / hw.peak_bf16_flops, parts)


def _cp_seconds(cfg, dims, hw, compute: float) -> float:
    """Ring attention's exposed time: K/V of each layer passed cp-1 times forward, twice that backward."""
    if dims.cp == 1:
        return 0.0
    m = cfg.model
    e = _element_bytes(cfg)
    kv = (m.n_kv_heads or m.n_heads) * (m.d_model // m.n_heads) // dims.tp
    tokens = cfg.micro_batch * m.seq_len // dims.cp
    passes = 3 * (dims.cp - 1) * m.n_layers * cfg.accum_steps(dims.dp)
    ring = passes * 2 * tokens * kv * e / _bandwidth(dims, "cp", hw)
    attention = compute * 6 * m.seq_len * m.d_model / models.get(m.arch).flops_per_token(m)
    return max(0.0, ring - attention)


def _ep_seconds(cfg, dims, hw) -> float:
    """The tokens' all-to-alls of one step on the ep group (E consecutive data-parallel ranks), exposed."""
    if dims.ep == 1:
        return 0.0
    from gpu_workbench.parallel.primitives.expert_parallel import predicted_step_bytes

    m = cfg.model
    nbytes = predicted_step_bytes(cfg, models.get(m.arch).moe_blocks(m), dims.dp) * _element_bytes(cfg) / 4
    return nbytes * (dims.ep - 1) / dims.ep / _spanning(dims.ep * dims.cp * dims.tp, hw)


def _dp_seconds(cfg, dims, hw, state: float, compute: float, mbs: int) -> float:
    """Data parallelism's exposed communication of one step (fp32 parameters and gradients)."""
    if cfg.recipe == "fsdp":
        n = dims.dp_shard * dims.cp
        bw = _bandwidth(dims, "dp_shard" if dims.dp_shard > 1 else "cp", hw)
        gathers = (2 if cfg.fsdp.reshard_after_forward else 1) * mbs
        total = (gathers + 1) * _ring(n, state, bw)
        return max(0.0, total - compute) + total / (gathers + 1) / max(1, cfg.model.n_layers)
    n = dims.dp_replicate * (dims.cp if cfg.recipe == "ddp" else 1)
    if n == 1:
        return 0.0
    reduce = _ring(n, state, _bandwidth(dims, "dp_replicate", hw), all_reduce=True)
    if cfg.recipe == "pipeline":   # after the schedule, in one flat buffer
        return reduce
    return max(0.0, reduce - compute * 2 / 3) + reduce / max(1, cfg.model.n_layers)
