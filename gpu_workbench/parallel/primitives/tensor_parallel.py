"""Tensor parallelism (Megatron) and sequence parallelism for the model of
parallel/models/transformer.py (any architecture: its ArchSpec says how the MLP splits and what the counts
are, parallel/models/).

Layout, on the mesh's `tp` dimension of T ranks (docs/ARCHITECTURE.md, Tensor parallelism):

    tok_emb        vocabulary-parallel: weight Shard(0) (V/T rows per rank); output all-reduced to Replicate
    pos_emb        replicated (its gradient is the same on every TP rank); llama has none (rotary)
    attn.q, k, v   column-parallel: weight Shard(0), so each rank holds n_heads/T whole heads (and
                   n_kv_heads/T key/value heads: a query head's group stays on its rank)
    attn.proj      row-parallel: weight Shard(1); output all-reduced (SP: reduce-scattered to Shard(1))
    mlp.up, gate   column-parallel (bias sharded too); llama's SwiGLU gate like up
    mlp.down       row-parallel (bias replicated, added once)
    ln1, ln2, ln_f replicated; SP: SequenceParallel, each rank normalises its T-th of the sequence
    head           column-parallel over the vocabulary: the logits stay a DTensor Shard(-1), and the loss is
                   torch's loss_parallel() cross-entropy, so the full (tokens, vocab) logits never exist
    tied weight    tok_emb.weight and head.weight are both Shard(0): one parameter again after parallelizing

Sequence parallelism (`tp.sequence_parallel`): the residual stream between blocks is a Shard(1) slice
(S/T positions per rank). The position embedding is added to the replicated embedding output; the first
block's input is then cut to this rank's slice (Replicate -> Shard(1), whose backward all-gathers).
Attention and MLP inputs are all-gathered (Shard(1) -> Replicate), their row-parallel outputs
reduce-scattered back to Shard(1).

Rank layout (parallel/runtime/dims.py): tp varies fastest, so ranks 2k and 2k+1 form a TP group at T = 2, and
data parallelism (dp_replicate for ddp, dp_shard for fsdp) runs across TP groups: with 4 ranks and T = 2,
TP groups {0, 1} and {2, 3}, data-parallel groups {0, 2} and {1, 3}.

This file holds the maths and the plans; `parallelize` (parallel/primitives/parallelize.py) applies them first, before
context and data parallelism, and the engines (recipes/parallel_engine.py) run the loss under
loss_parallel and reduce what TP leaves Partial. Under ddp the data-parallel gradient average is done by
hand, once per step, on the local shards (DDP does not take DTensor parameters); under fsdp, fully_shard
shards the TP DTensors further (the 2-D layout).

Context parallelism beside TP: each rank takes its cp shard's positions, tokens and targets (T/C of
them); TP then splits heads (and SP the T/C positions) as without it, and ring attention passes this
rank's heads' K/V around the cp group. The vocabulary-parallel loss is the mean over the T/C tokens, the
same on the TP ranks of a cp rank; the loop's mean over all ranks is single's mean over every token. The
gradient all-reduce averages over dp_replicate x cp (the ranks with this rank's tp coordinate): the mean
over the C cp ranks of each one's gradient of its shard's mean loss is the gradient of the whole
sequence's mean, as DDP's average over every rank is for ddp x cp. fsdp x cp x tp shards over dp_shard x cp
(one mesh dimension) beside tp.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from gpu_workbench.parallel import models
from gpu_workbench.parallel.models.moe import MoE
from gpu_workbench.parallel.models.transformer import d_ff, kv_heads
from gpu_workbench.parallel.runtime import compat, memory
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.summary import TensorParallelStats
from gpu_workbench.profiling import listening
from gpu_workbench.profiling import range as prange


# ---- checks (before any process starts) -----------------------------------------------------
def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t   # this rank's shard


def validate(cfg, refusal: str | None) -> None:
    """tp.degree > 1: the recipe composes (`refusal`, its Recipe.tensor_parallel, is None), and the model's
    sharded sizes divide by T (one line each)."""
    t, m = cfg.tp.degree, cfg.model
    if t == 1:
        return
    if refusal is not None:
        raise UserError(f"tp.degree = {t} does not work with recipe={cfg.recipe}: {refusal}")
    if models.get(m.arch).tensor_parallel is not None:
        raise UserError(f"tp.degree = {t} does not work with model.arch={m.arch}: {models.get(m.arch).tensor_parallel}")
    for field, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", kv_heads(m)), ("model.d_ff", d_ff(m)),
                         ("model.vocab_size", m.vocab_size)):
        if value % t:
            raise UserError(f"{field} ({value}) must be divisible by tp.degree ({t}): tensor parallelism splits it")
    c = cfg.cp.degree   # under context parallelism SP splits each cp rank's seq_len / cp.degree positions
    if cfg.tp.sequence_parallel and c == 1 and m.seq_len % t:
        raise UserError(f"model.seq_len ({m.seq_len}) must be divisible by tp.degree ({t}) with "
                        f"tp.sequence_parallel = true (each rank holds seq_len / tp.degree positions)")
    if cfg.tp.sequence_parallel and c > 1 and (m.seq_len // c) % t:
        raise UserError(f"model.seq_len / cp.degree ({m.seq_len} / {c} = {m.seq_len // c}) must be divisible by "
                        f"tp.degree ({t}) with tp.sequence_parallel = true (each rank holds seq_len / cp.degree / "
                        f"tp.degree positions)")
    if m.fused_head_loss:
        raise UserError("model.fused_head_loss does not work with tp.degree > 1: the head is vocabulary-parallel "
                        "and its loss is loss_parallel's; use model.fused_head_loss=false")


# ---- the layout -------------------------------------------------------------------------------
def block_plan(sp: bool, mlp_plan: dict[str, str]) -> dict:
    """One block's plan; `mlp_plan` is the architecture's (ArchSpec.mlp_plan: each MLP Linear colwise or
    rowwise; SwiGLU's gate is split like up, so each rank multiplies its own columns of both). Attention and
    MLP take their input as one DTensor (use_local_output=False), so the three projections' input gradients
    are summed before one collective, not reduced three times."""
    seq, rep = Shard(1), Replicate()
    outer = seq if sp else rep   # the residual stream's layout between modules
    plan = {
        # (x, positions): the token positions (None or a plain tensor) pass through unchanged
        "attn": PrepareModuleInput(input_layouts=(outer, None), desired_input_layouts=(rep, None)),
        "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=outer),
        "mlp": PrepareModuleInput(input_layouts=(outer,), desired_input_layouts=(rep,)),
    }
    for name, kind in mlp_plan.items():
        plan[f"mlp.{name}"] = ColwiseParallel() if kind == "colwise" else RowwiseParallel(output_layouts=outer)
    if sp:
        plan.update({"ln1": SequenceParallel(), "ln2": SequenceParallel()})
    return plan


def outer_plan(sp: bool) -> dict:
    """Embeddings, final norm and head. The embedding output is Replicate in both modes, so GPT.embed adds
    the whole position embedding; SP then cuts the first block's input to this rank's slice."""
    plan = {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "head": ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1),
                                use_local_output=False),   # a DTensor for loss_parallel
    }
    if sp:
        plan["ln_f"] = SequenceParallel()
        plan["blocks.0"] = PrepareModuleInput(input_layouts=(Replicate(), None), desired_input_layouts=(Shard(1), None),
                                              use_local_output=True)
    return plan


def apply(model: nn.Module, tp_mesh, sp: bool, arch: models.ArchSpec) -> nn.Module:
    """Apply the layout of architecture `arch` in place on the 1-D mesh `tp_mesh`, to a whole GPT or to one
    pipeline stage (parallel/primitives/pipeline/stages.py: StageModule, whose submodule names are the GPT's: the outer
    plan applies to what it holds); re-tie a tied head."""
    head, emb = getattr(model, "head", None), getattr(model, "tok_emb", None)
    tied = head is not None and emb is not None and head.weight is emb.weight
    blocks = model.blocks.values() if isinstance(model.blocks, nn.ModuleDict) else model.blocks
    for block in blocks:
        if isinstance(block.mlp, MoE):   # routed experts: replicated over tp, the input a plain tensor
            parallelize_module(block, tp_mesh, {k: v for k, v in block_plan(sp, {}).items() if k != "mlp"})
        else:
            parallelize_module(block, tp_mesh, block_plan(sp, arch.mlp_plan))
    held = {name for name, _ in model.named_modules()}
    parallelize_module(model, tp_mesh, {k: v for k, v in outer_plan(sp).items() if k in held})
    if tied:   # both got their own Shard(0) copy of the same values: make them one parameter again
        model.head.weight = model.tok_emb.weight
    return model


# ---- gradients ----------------------------------------------------------------------------------
def reduce_partial_grads(module: nn.Module) -> None:
    """Sequence parallelism leaves a replicated norm's gradient Partial (each rank saw S/T positions): sum
    it over the TP group once per step, after the last micro-batch (Partial gradients accumulate exactly)."""
    for p in module.parameters():
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            with prange("tp.reduce_norm_grads"):
                p.grad = g.redistribute(placements=p.placements)


def replicas(t: torch.Tensor, world_size: int) -> int:
    """How many ranks hold each element of `t`: the world divided by the ranks its Shard dims split it over."""
    shards = 1
    if isinstance(t, DTensor):
        for size, placement in zip(t.device_mesh.shape, t.placements, strict=True):
            if placement.is_partial():
                raise RuntimeError(f"a gradient is still Partial ({t.placements}): it was never reduced")
            # not is_shard(): FSDP2's _StridedShard (dim 0 split by TP, then by FSDP) is no Shard subclass
            shards *= 1 if placement.is_replicate() else size
    return world_size // shards


def global_grad_norm(grads: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """L2 norm (float64) over every rank's gradient shards, each element counted once: a rank's squares are
    divided by how many ranks hold the same elements, then summed over the world (one all-reduce)."""
    sq = torch.zeros((), dtype=torch.float64)
    for g in grads:
        sq += local(g).detach().double().pow(2).sum() / replicas(g, world_size)
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(sq)
    return sq.sqrt()


def tp_sharded_params(m) -> int:
    """Ψs: parameters the layout splits over T (the blocks' share, the vocabulary-parallel embedding and
    head); everything else (Ψr) is replicated. From the shapes alone."""
    vocab = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    spec = models.get(m.arch)   # a MoE block's MLP is replicated over tp: not split
    return m.n_layers * spec.sharded_per_block(m) - spec.moe_blocks(m) * spec.dense_mlp_params(m) + vocab


def params_per_rank(m, n_params: int, t: int) -> int:
    """Ψs/T + Ψr: the parameters one TP rank holds (before any data-parallel sharding)."""
    sharded = tp_sharded_params(m)
    return sharded // t + (n_params - sharded)


def stage_params_per_rank(m, n_blocks: int, first: bool, last: bool, t: int) -> int:
    """Ψs/T + Ψr of one pipeline stage (docs/ARCHITECTURE.md, Tensor parallelism): its blocks, the embeddings
    on the first stage, ln_f and the head (a tied head is a copy there, sharded as tok_emb) on the last."""
    arch = models.get(m.arch)
    vocab = int(first) + int(last) - int(first and last and m.tie_embeddings)   # one tied weight on one stage
    sharded = n_blocks * arch.sharded_per_block(m) + vocab * m.vocab_size * m.d_model
    # per block: two norms and the row-parallel biases; a learned position table on the first stage
    positions = arch.position_params(m) if first else 0
    replicated = n_blocks * arch.replicated_per_block(m) + positions + (arch.norm_params(m) if last else 0)
    return sharded // t + replicated


def memory_model(sharded: str) -> memory.MemoryModel:
    """torch AdamW bytes per parameter over the parameters one TP rank holds, Ψs/T + Ψr."""
    return memory.torch_adamw(sharded, psi="(Ψs/T+Ψr)")


# ---- communication -------------------------------------------------------------------------------
def predicted_step_bytes(cfg, micro_batches: int, stage: tuple[int, bool, bool] | None = None) -> dict:
    """Payload bytes one TP rank hands to TP collectives in one step (forward + backward), from the shapes.
    An all-reduce's and a reduce-scatter's payload is the full tensor M, an all-gather's its local M/T;
    M = micro_batch x seq_len x d_model x 4 B (fp32 activations). Per micro-batch:
      no SP: all-reduces: embedding, proj, down (forward); attention, MLP, head inputs (backward): (4L+2) M
      SP:    all-gathers: attention, MLP, head inputs (forward), proj, down, first block (backward): (4L+2) M/T;
             reduce-scatters: proj, down (forward), attention, MLP, head inputs (backward): (4L+1) M;
             the embedding's all-reduce: M
      both:  the vocabulary-parallel loss, 3 all-reduces of one fp32 per token (max, sum of exp, target logit)
    SP once per step: the norms' gradients, (2L+1) x 2 all-reduces of d_model fp32 (LayerNorm's weight and
    bias; llama's RMSNorm: x 1, its weight).
    Activation checkpointing recomputes each block's forward up to its last saved tensor (torch stops there,
    before `down`): per block and micro-batch, no SP the proj all-reduce (M), SP two all-gathers and the proj
    reduce-scatter (2 M/T + M).
    `stage` = (L, first, last): one pipeline stage's share (docs/ARCHITECTURE.md, Tensor parallelism): its L
    blocks; the embedding's collective only on the first stage, the head's and the loss's only on the last;
    4L+2 becomes 4L+f+l, 2L+1 becomes 2L+l."""
    m, t, c = cfg.model, cfg.tp.degree, cfg.cp.degree
    blocks, first, last = stage or (m.n_layers, True, True)
    tokens = cfg.micro_batch * m.seq_len // c   # context parallelism: this rank's cp shard of each sequence
    act, n = tokens * m.d_model * 4, 4 * blocks + int(first) + int(last)
    per_mb = n * act + (3 * tokens * 4 if last else 0)
    per_step, sp, recompute = 0, cfg.tp.sequence_parallel, m.activation_checkpointing == "full"
    if sp:
        per_mb += n * act // t
        per_step = (2 * blocks + int(last)) * models.get(m.arch).norm_params(m) * 4
    if recompute:
        per_mb += blocks * (act + (2 * act // t if sp else 0))
    formula = "((4L+2) M + 12 tokens) x micro-batches"
    if sp:
        formula = (f"((4L+2) M + (4L+2) M/T + 12 tokens) x micro-batches + (2L+1) x "
                   f"{4 * models.get(m.arch).norm_params(m) // m.d_model} d_model")
    if recompute:
        formula += " + L (M + 2 M/T) x micro-batches (recomputed)" if sp else " + L M x micro-batches (recomputed)"
    if stage is not None:
        formula = f"stage (L={blocks}, f={int(first)}, l={int(last)}): " + formula.replace("4L+2", "4L+f+l").replace(
            "2L+1", "2L+l").replace("12 tokens", "12 l tokens")
    seq = "seq_len" if c == 1 else f"seq_len/{c} (cp.degree)"
    return {"bytes": per_mb * micro_batches + per_step,
            "formula": f"{formula}; M = micro_batch x {seq} x d_model x 4 B, tokens = micro_batch x {seq}"}


def tp_stats(cfg, measured: dict | None, predicted: list[dict]) -> TensorParallelStats:
    """The summary's `tp` part: one step's collectives as measured (None: no step was measured) beside the
    prediction, the sum of `predicted` (predicted_step_bytes of each part this rank holds: the model, or
    its pipeline stages)."""
    return TensorParallelStats(
        tp_degree=cfg.tp.degree, tp_sequence_parallel=cfg.tp.sequence_parallel,
        tp_collectives_per_step_measured=measured["ops"] if measured else None,
        tp_bytes_per_step_per_rank_measured=measured["bytes"] if measured else None,
        tp_bytes_per_step_per_rank_predicted=sum(p["bytes"] for p in predicted),
        tp_predicted_formula=" + ".join(p["formula"] for p in predicted))


class CollectiveWatch:
    """Tensor parallelism's collectives, seen through compat.collective_counter: counted during one step
    (the second: the first may differ, lazy initialisation), and each put in a range on every step a
    profiler or the host timeline listens to. The dispatch mode costs time on every op, so it is entered
    only on those steps."""

    def __init__(self, steps: int, counting: bool = True):
        self.measured: dict | None = None
        self.measure_step = 1 if steps > 1 else 0
        # False under train.compile: torch.compile refuses a graph run inside a (non-infra) dispatch mode, so
        # the summary's measured tp collectives stay None there
        self.counting = counting

    @contextlib.contextmanager
    def step(self, step: int):
        measure = self.measured is None and step >= self.measure_step
        traced = listening()
        if not self.counting or not (measure or traced):
            yield
            return
        with compat.collective_counter(prange if traced else None) as counter:
            yield
        if measure:
            self.measured = {"ops": counter.ops, "bytes": counter.bytes}
