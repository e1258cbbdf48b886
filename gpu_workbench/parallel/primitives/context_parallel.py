"""Context parallelism: the sequence split over the C ranks of a cp group, attention as ring attention.

Sequence sharding. `load_balance = "headtail"`: the sequence is cut into 2C equal chunks and cp rank i
holds chunks i and 2C-1-i (head and tail), so that under a causal mask every rank has the same work;
`"none"`: rank i holds the contiguous chunk i of C (the last rank attends to the whole prefix, the first to
its own chunk only). A rank's tokens, targets and positions are those chunks, in that order
(`shard_positions`, `shard_sequence`); the model takes the positions for its position embedding.

Ring attention (`RingAttention`, an autograd Function). Forward, on every rank: C steps; at step s the
rank holds the K/V of cp rank (r - s) mod C. Before computing with it, it posts the transfer that passes
that K/V on to rank r+1 and receives the next from r-1 (`dist.batch_isend_irecv`), so communication
overlaps compute where the backend allows. Each (q-chunk, kv-chunk) pair is a block, decided by the
chunks' positions: a kv chunk before the q chunk is a full block, the same chunk the causal diagonal
block (equal lengths: bottom-right and top-left causal coincide), a chunk after it is skipped (no kernel
call). Each block's (out, lse) from kernels.attention_forward is merged into the running output with the
log-sum-exp, in fp32. Backward: K/V go round once more; dK/dV accumulators travel with them (one step
behind, so that each rank's own return to it after C transfers), and every block's share of dq, dk, dv
comes from kernels.attention_backward given the merged out and lse saved by the forward.

`ContextParallelStats` counts what was measured: kernel calls (blocks) forward and backward, and the
bytes of every tensor passed to isend, and the ring transfers they went in. `cp_group(dims, rank)` makes
the cp groups of a layout; `apply(model, cp_group, cfg)` sets every attention module's `attend` hook to
ring attention and returns the stats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from gpu_workbench import kernels
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.profiling import range as prange

LOAD_BALANCE = ("headtail", "none")


# ---- sequence sharding --------------------------------------------------------------------------
def chunks_of(cp_rank: int, degree: int, load_balance: str) -> list[int]:
    """The chunk indices cp_rank holds, in order: of 2C chunks (headtail) or C (none)."""
    if load_balance == "headtail":
        return [cp_rank, 2 * degree - 1 - cp_rank]
    if load_balance == "none":
        return [cp_rank]
    raise UserError(f"cp.load_balance must be one of {', '.join(LOAD_BALANCE)}, got {load_balance!r}")


def check_seq_len(seq_len: int, degree: int, load_balance: str) -> None:
    """One line when the sequence does not cut into the chunks the load balance needs."""
    n_chunks = degree * len(chunks_of(0, degree, load_balance))
    if seq_len % n_chunks:
        raise UserError(f"model.seq_len ({seq_len}) must be divisible by {n_chunks} (cp.degree {degree} x "
                        f"{n_chunks // degree} chunks per rank with cp.load_balance={load_balance})")


def shard_positions(seq_len: int, cp_rank: int, degree: int, load_balance: str) -> torch.Tensor:
    """The positions (indices into the sequence) that cp_rank holds, as an int64 tensor."""
    check_seq_len(seq_len, degree, load_balance)
    held = chunks_of(cp_rank, degree, load_balance)
    length = seq_len // (degree * len(held))
    return torch.cat([torch.arange(c * length, (c + 1) * length) for c in held])


def shard_sequence(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a (B, T, ...) batch of tokens or targets."""
    return x[:, positions.to(x.device)]


# ---- measurements -------------------------------------------------------------------------------
@dataclass
class ContextParallelStats:
    degree: int
    load_balance: str
    blocks_forward: int = 0        # attention_forward calls: (q-chunk, kv-chunk) blocks not skipped
    blocks_backward: int = 0       # attention_backward calls
    transfers_forward: int = 0     # ring steps that sent K/V on
    transfers_backward: int = 0    # ring steps that sent K/V and/or the travelling dK/dV on
    bytes_sent_forward: int = 0    # sum of the nbytes of every tensor passed to isend
    bytes_sent_backward: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def predicted_bytes(k: torch.Tensor, degree: int, grad_dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(forward, backward) bytes one rank sends for one attention call with local K (and V) like k: K and V
    passed on C-1 times each way, and the dK/dV accumulators (grad_dtype) C times in backward."""
    kv = 2 * k.numel() * k.element_size()
    return (degree - 1) * kv, (degree - 1) * kv + degree * 2 * k.numel() * grad_dtype.itemsize


# ---- the ring ----------------------------------------------------------------------------------
class Ring:
    """One rank's view of the cp group: its neighbours, its chunks, and how each block is computed."""

    def __init__(self, group, load_balance: str, causal: bool = True, scale: float | None = None,
                 backend: str | None = None, stats: ContextParallelStats | None = None):
        self.group = group
        self.degree, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if self.degree < 2:   # a ring of one would send to itself; plain attention is the same thing
            raise ValueError(f"ring attention needs a cp group of at least 2 ranks, got {self.degree}")
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.degree)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.degree)
        self.load_balance, self.causal, self.scale, self.backend = load_balance, causal, scale, backend
        self.stats = stats or ContextParallelStats(self.degree, load_balance)

    def source(self, step: int) -> int:
        """The cp rank whose K/V this rank holds at ring step `step`."""
        return (self.rank - step) % self.degree

    def blocks(self, step: int, length: int) -> list[tuple[slice, slice, bool]]:
        """(q rows, kv rows, causal) of each block to compute at this step; skipped blocks are left out."""
        mine = chunks_of(self.rank, self.degree, self.load_balance)
        theirs = chunks_of(self.source(step), self.degree, self.load_balance)
        size = length // len(mine)
        out = []
        for i, qc in enumerate(mine):
            for j, kc in enumerate(theirs):
                if self.causal and kc > qc:
                    continue   # every key of the chunk lies after every query: nothing to see
                out.append((slice(i * size, (i + 1) * size), slice(j * size, (j + 1) * size),
                            self.causal and kc == qc))
        return out

    def exchange(self, sends: list[torch.Tensor]) -> tuple[list, list[torch.Tensor]]:
        """Post sends to the next rank and receives of like tensors from the previous one; (requests, buffers)."""
        recvs = [torch.empty_like(t) for t in sends]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recvs]
        with prange("cp.issue", bytes=sum(t.numel() * t.element_size() for t in sends)):
            return dist.batch_isend_irecv(ops), recvs

    def forward(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of this rank's queries against every rank's keys; lse fp32 (B, Hq, T_local)."""
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_zeros(q.shape, dtype=acc)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=acc)
        for step in range(self.degree):
            pending = None
            if step < self.degree - 1:   # post the next transfer first: it overlaps this step's blocks
                pending = self.exchange([k, v])
                self.stats.transfers_forward += 1
                self.stats.bytes_sent_forward += k.nbytes + v.nbytes
            for rows, keys, causal in self.blocks(step, q.shape[2]):
                o, l = kernels.attention_forward(q[:, :, rows], k[:, :, keys], v[:, :, keys], causal=causal,
                                                 scale=self.scale, backend=self.backend)
                out[:, :, rows], lse[:, :, rows] = merge(out[:, :, rows], lse[:, :, rows], o, l)
                self.stats.blocks_forward += 1
            if pending is not None:
                _wait(pending[0])
                k, v = pending[1]
        return out.to(q.dtype), lse

    def backward(self, do, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of this rank's q, k, v: dK/dV accumulators travel with K/V and come home after C steps."""
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = q.new_zeros(q.shape, dtype=acc)
        travelling = None   # (requests, [dk, dv]) of the accumulators on their way from the previous rank
        for step in range(self.degree):
            pending = self.exchange([k, v]) if step < self.degree - 1 else None
            dk, dv = k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc)
            for rows, keys, causal in self.blocks(step, q.shape[2]):
                bq, bk, bv = kernels.attention_backward(do[:, :, rows], q[:, :, rows], k[:, :, keys],
                                                        v[:, :, keys], out[:, :, rows], lse[:, :, rows],
                                                        causal=causal, scale=self.scale, backend=self.backend)
                dq[:, :, rows] += bq
                dk[:, :, keys] += bk
                dv[:, :, keys] += bv
                self.stats.blocks_backward += 1
            if travelling is not None:   # add this step's share to the accumulators of the K/V held now
                _wait(travelling[0])
                dk, dv = dk + travelling[1][0], dv + travelling[1][1]
            travelling = self.exchange([dk, dv])
            sent = dk.nbytes + dv.nbytes + (k.nbytes + v.nbytes if pending is not None else 0)
            self.stats.transfers_backward += 1
            self.stats.bytes_sent_backward += sent
            if pending is not None:
                _wait(pending[0])
                k, v = pending[1]
        _wait(travelling[0])   # after C transfers, the accumulators of this rank's own K/V are back
        dk, dv = travelling[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _wait(requests) -> None:
    """Wait for one ring transfer: a `cp.wait` range (gloo's point-to-point works have no future, so the
    timeline shows the issue and the wait, and the time between them is the transfer's overlap)."""
    with prange("cp.wait"):
        for req in requests:
            req.wait()


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """The log-sum-exp merge of two partial attentions over disjoint keys: (out, lse) over both key sets.
    Each side is weighted by exp(its lse - the new lse) <= 1, so nothing overflows; rows neither side
    has seen (lse -inf on both) stay 0 with lse -inf."""
    new = torch.logaddexp(lse, block_lse.to(lse.dtype))
    safe = new.masked_fill(new == float("-inf"), 0.0)
    merged = out * torch.exp(lse - safe)[..., None] + block_out.to(out.dtype) * torch.exp(block_lse - safe)[..., None]
    return merged, new


class RingAttention(torch.autograd.Function):
    """out = attention(q, k, v) over the whole sequence, each rank holding its chunks of q, k and v."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()   # isend takes contiguous tensors
        out, lse = ring.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        return out

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.ring.backward(do.contiguous(), q, k, v, out, lse)
        return dq, dk, dv, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
    return RingAttention.apply(q, k, v, ring)


# ---- applying it to a model ---------------------------------------------------------------------
def cp_members(dims) -> list[list[int]]:
    """The cp groups' ranks: ranks whose coordinates (parallel/runtime/dims.py) differ in cp alone, grouped."""
    return dims.groups(("cp",))


def own_group(members: list[list[int]], rank: int):
    """A process group for each member list, made on every rank in the same order (new_group is
    collective); returns the one `rank` is in."""
    mine = None
    for ranks in members:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def cp_group(dims, rank: int):
    """This rank's cp group, a process group of its own, so that the ring's point-to-point traffic never
    shares a group with data parallelism's all-reduce. Collective: every rank makes every group, in order."""
    return own_group(cp_members(dims), rank)


def apply(model: nn.Module, cp_group, cfg, backend: str | None = None) -> ContextParallelStats:
    """Make every attention module of `model` attend through causal ring attention over `cp_group`, with the
    load balance of `cfg` (the [cp] section); the model is otherwise unchanged. Returns the shared stats."""
    ring = Ring(cp_group, cfg.load_balance, causal=True, backend=backend)
    for module in model.modules():
        if hasattr(module, "attend"):
            module.attend = lambda q, k, v: ring_attention(q, k, v, ring)
    return ring.stats


def setup_rank(model: nn.Module, cfg, ctx) -> tuple[torch.Tensor, ContextParallelStats]:
    """Ring attention in every block over this rank's cp group; (this rank's positions on ctx.device, the
    ring's stats). What ddp x cp, fsdp x cp and ddp x cp x tp share. Collective (makes the cp groups)."""
    stats = apply(model, cp_group(ctx.dims, ctx.rank), cfg.cp)
    c = ctx.dims.coords(ctx.rank)["cp"]
    positions = shard_positions(cfg.model.seq_len, c, cfg.cp.degree, cfg.cp.load_balance)
    return positions.to(ctx.device), stats


# ---- the summary part ---------------------------------------------------------------------------
def step_traffic(before: dict, after: dict) -> dict:
    """One training step's ring traffic: the difference of two ContextParallelStats snapshots."""
    return {k: after[k] - before[k] for k in ("blocks_forward", "bytes_sent_forward", "bytes_sent_backward")}


def cp_summary(cfg, dims, measured: dict | None):
    """The summary's `cp` part from one step's measured traffic (None: no step measured) beside the
    prediction. Collective (gathers every rank's block count)."""
    from gpu_workbench.parallel.runtime.distributed import gather
    from gpu_workbench.parallel.runtime.summary import ContextParallelStatsPart

    blocks = gather(measured["blocks_forward"] if measured else -1)
    c, m = cfg.cp.degree, cfg.model
    kv = getattr(m, "n_kv_heads", None) or m.n_heads
    k = torch.empty(cfg.micro_batch, kv // cfg.tp.degree, m.seq_len // c, m.d_model // m.n_heads)
    fwd, bwd = predicted_bytes(k, c)
    sent = measured["bytes_sent_forward"] + measured["bytes_sent_backward"] if measured else None
    return ContextParallelStatsPart(
        cp_degree=c, cp_load_balance=cfg.cp.load_balance,
        cp_attention_blocks_per_rank=blocks if measured else None,
        cp_ring_bytes_per_step_per_rank_measured=sent,
        cp_ring_bytes_per_step_per_rank_predicted=cfg.accum_steps(dims.dp) * m.n_layers * (fwd + bwd))
