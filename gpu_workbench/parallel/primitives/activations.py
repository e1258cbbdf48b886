"""Activation memory per rank, estimated from the shapes (a dry run's and `wb plan`'s; nothing measures it on
this box): what autograd keeps for backward, per micro-batch, times the micro-batches a rank holds at once.

Per block and token (e = 2 bytes under bf16 autocast, 4 in fp32; h = d_model, f = the MLP width, kv = the
key/value width), counting the tensors the block's ops save (SDPA keeps q, k, v, its output and a
log-sum-exp, never the T x T scores):
    attention   e (h + h + 2 kv + h)        normed input, q, k, v, output (proj's input)
    MLP         e (h + 2f) gelu | e (h + 4f) swiglu    normed input, up (and gate), activation (and product)
    norms       4 (2h)                      the fp32 residual stream into both norms
Tensor parallelism divides the q/k/v, output and f terms by T; sequence parallelism divides all of them.
Full activation checkpointing (model.activation_checkpointing = "full"; "selective" is counted as "none",
an upper bound) keeps each block's input (4h) and, during the
backward, one block's full set again. The head's fp32 logits (4 V / T per token) unless fused_head_loss.
In flight: one micro-batch, or under a pipeline the most the schedule simulator keeps on this stage-rank.
"""

from __future__ import annotations

from gpu_workbench.parallel import models


def per_block_token(cfg, t: int, sp: bool) -> tuple[float, float]:
    """(bytes one block keeps per token, bytes of its input alone), under tensor parallelism of degree t."""
    m = cfg.model
    spec = models.get(m.arch)
    e = 4 if cfg.precision == "fp32" else 2   # bf16, fp16 and fp8 (bf16 around its float8 linears)
    h, f = m.d_model, spec.d_ff(m)
    kv = (m.n_kv_heads or m.n_heads) * (h // m.n_heads)
    mlp_inner = (4 if len(spec.mlp_plan) == 3 else 2) * f
    split = e * (h + 2 * kv + h + mlp_inner) / t          # q, k, v, attention output, the MLP's inner tensors
    whole = e * (h + h) + 4 * 2 * h                       # the two normed inputs, the fp32 residual stream
    return split + (whole / t if sp else whole), (4 * h / t if sp else 4 * h)


def activation_bytes(cfg, dims, rank: int, engine=None) -> int:
    """This rank's activation bytes at its peak (an estimate, see the module's docstring)."""
    m = cfg.model
    tokens = cfg.micro_batch * m.seq_len // dims.cp
    block, block_input = per_block_token(cfg, dims.tp, cfg.tp.sequence_parallel)
    layers, first, last = _layers(engine, m.n_layers, dims.pp)
    if m.activation_checkpointing == "full":   # selective keeps the matmuls' outputs: counted as none
        per_mb = tokens * block_input * layers
        recompute = tokens * block
    else:
        per_mb, recompute = tokens * block * layers, 0
    head = 0 if m.fused_head_loss or not last else tokens * 4 * m.vocab_size / dims.tp
    return int(per_mb * inflight(cfg, dims, rank) + recompute + head)


def _layers(engine, n_layers: int, pp: int) -> tuple[int, bool, bool]:
    """(blocks on this rank, holds the first stage, holds the last): a laid-out pipeline's stages; without an
    engine (wb plan) the biggest even stage, counted with the head (the most any stage-rank can hold)."""
    stages = getattr(engine, "stages", None)
    if not stages:
        return -(-n_layers // pp), True, True
    return sum(len(s.blocks) for s in stages), any(s.is_first for s in stages), any(s.is_last for s in stages)


def inflight(cfg, dims, rank: int) -> int:
    """Micro-batches whose activations this rank holds at once: 1, or under a pipeline the simulator's peak
    on this stage-rank (parallel/primitives/pipeline/schedule.py), equal costs per stage."""
    if cfg.recipe != "pipeline" or dims.pp == 1:
        return 1
    from gpu_workbench.parallel.primitives.pipeline.schedule import simulate

    sim = simulate(cfg.pp.schedule, dims.pp, cfg.pp.microbatches, cfg.pp.virtual_stages)
    return sim.peak_inflight[dims.coords(rank)["pp"]]
