"""Expert parallelism (`ep.degree = E > 1`, docs/ARCHITECTURE.md, Expert parallelism): each MoE layer's experts
split over E ranks borrowed from the data-parallel dimension, tokens sent to their experts' ranks and back
with `all_to_all_single` (uneven splits).

Layout (torchtitan's: ep is the inner part of data parallelism). Data-parallel index d = outer x E + e:
the E consecutive data-parallel ranks with the same `outer` (and tp coordinate) form an ep group; rank e of
it holds experts [e x X/E, (e+1) x X/E), a DTensor Shard(0) on the ep mesh. The dp / E ranks with the same
e hold the same experts: their gradients are summed over that group and divided by dp (every rank's loss is
the mean over its own tokens, as data parallelism averages). Every other parameter is data-parallel as
before (ddp or fsdp over all dp ranks, tp for attention). Under tp the MoE block's input is replicated over
the tp group: every tp rank routes the same tokens and runs the same experts.

One MoE forward on a rank, with S local slots sorted by global expert:
    1. counts (X,) -> all_to_all -> how many rows each source sends to each of my experts
    2. rows     all_to_all_single(split by destination rank) -> rows ordered (source, my expert)
    3. permute to (my expert, source), run my experts grouped, permute back
    4. rows     all_to_all_single back (splits swapped) -> my slots' outputs in my order
The all-to-alls are autograd functions: backward runs the same exchange the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor

from gpu_workbench.parallel.models.moe import MoE
from gpu_workbench.parallel.runtime import compat
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.profiling import range as prange


# ---- checks (before any process starts) -----------------------------------------------------
def validate(cfg, dims) -> None:
    """ep.degree > 1 under a recipe that composes: experts to split, sizes that divide (one line each)."""
    e, experts = cfg.ep.degree, cfg.model.moe.experts
    if not experts:
        raise UserError(f"ep.degree = {e} needs experts to split: set model.moe.experts > 0")
    if experts % e:
        raise UserError(f"model.moe.experts ({experts}) must be divisible by ep.degree ({e})")
    if dims.dp % e:
        raise UserError(f"ep.degree ({e}) must divide the data-parallel ranks ({dims.dp}): experts are split over "
                        f"ranks borrowed from data parallelism")
    if dims.cp > 1 or dims.pp > 1:
        raise UserError(f"ep.degree = {e} does not compose with cp.degree > 1 or the pipeline yet")
    if cfg.tp.sequence_parallel:
        raise UserError(f"ep.degree = {e} does not compose with tp.sequence_parallel yet (the MoE input is "
                        f"replicated over the tp group)")


# ---- the layout -------------------------------------------------------------------------------
def mesh(dims, e: int, device_type: str):
    """A (dp / E, E, tp) mesh over the world: rank r = d x tp + t (pp = cp = 1) and data-parallel index
    d = outer x E + inner, row-major. Collective."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dims.dp // e, e, dims.tp), mesh_dim_names=("dp_mod_ep", "ep", "tp"))


@dataclass
class ExpertLayout:
    """What `apply` did: the expert parameters and their gradient group, the all-to-all traffic."""

    params: list[nn.Parameter]
    same_group: object          # the ranks holding the same experts (dp / E of them)
    same_size: int
    dp: int
    same_mesh: object = None    # those ranks as a mesh dimension (fsdp shards the experts over it)
    sharded: bool = False       # fsdp shards the experts over same_mesh and reduces their gradients
    sent_bytes: int = 0         # rows this rank handed to all_to_all_single (forward and backward), in bytes
    measured: int | None = None   # sent_bytes of one training step (ParallelEngine.train_step)

    def count(self, t: torch.Tensor) -> None:
        self.sent_bytes += t.numel() * t.element_size()

    def counting(self, t: torch.Tensor) -> torch.Tensor:
        """`t`, whose gradient backward sends through the all-to-all's reverse: counted when it arrives."""
        if t.requires_grad:
            t.register_hook(lambda g: self.count(g))
        return t


def apply(model: nn.Module, cfg, ctx, device_type: str) -> ExpertLayout:
    """Shard every MoE layer's experts over this rank's ep group and swap in the all-to-all dispatch."""
    e, dims = cfg.ep.degree, ctx.dims
    world = mesh(dims, e, device_type)
    ep_mesh = world["ep"]
    layout = ExpertLayout([], world["dp_mod_ep"].get_group(), dims.dp // e, dims.dp, world["dp_mod_ep"])
    for layer in (m for m in model.modules() if isinstance(m, MoE)):
        for name, p in list(layer.experts.named_parameters()):
            sharded = nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)]))
            setattr(layer.experts, name, sharded)
            layout.params.append(sharded)
        layer.dispatch = Dispatch(layer.experts, ep_mesh.get_group(), e, layout)
    return layout


def shard(model: nn.Module, layout: ExpertLayout, reshard: bool) -> None:
    """fsdp: each MoE layer's experts an FSDP2 unit of their own over the dp / E ranks holding the same experts
    (the ep DTensors sharded further on dim 0: a 2-D layout, as fsdp x tp's); its reduce-scatter averages over
    those dp / E ranks, and reduce_grads turns that into the sum / dp. (set_gradient_divide_factor would do it
    in the reduce-scatter, through PREMUL_SUM, which gloo lacks.) Before the blocks' units, which then leave
    the experts alone."""
    from torch.distributed.fsdp import fully_shard

    layout.params, layout.sharded = [], True
    for layer in (m for m in model.modules() if isinstance(m, MoE)):
        fully_shard(layer.experts, mesh=layout.same_mesh, reshard_after_forward=reshard)
        layout.params += list(layer.experts.parameters())   # fully_shard made new Parameters


class Dispatch:
    """MoE.dispatch under expert parallelism: (rows grouped by global expert, rows per expert) -> outputs.
    A plain object, not a module: the experts' parameters keep their one name in the state dict."""

    def __init__(self, experts: nn.Module, group, e: int, layout: ExpertLayout):
        self.experts, self.group, self.e, self.layout = experts, group, e, layout

    def __call__(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        e, ex = self.e, self.experts
        mine = len(counts) // e
        send = torch.tensor(counts, dtype=torch.long).view(e, mine)
        recv = torch.empty_like(send)
        with prange("ep.counts"):
            dist.all_to_all_single(recv, send, group=self.group)      # recv[s, l]: source s's rows for my expert l
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        with prange("ep.dispatch"):
            rows = compat.all_to_all_autograd(x.new_empty(sum(out_splits), x.shape[1]), x, out_splits, in_splits,
                                              self.group)
        order = by_expert(recv)
        ys = ex(rows[order], recv.sum(0).tolist())   # a module call: fsdp gathers the experts' shards first
        back = torch.empty_like(ys).index_copy_(0, order, ys)          # (my expert, source) -> (source, my expert)
        with prange("ep.combine"):
            out = compat.all_to_all_autograd(x.new_empty(x.shape[0], ys.shape[1]), back, in_splits, out_splits,
                                             self.group)
        for t in (x, back):   # what this rank sent forward; their gradients go back in backward
            self.layout.count(t)
        self.layout.counting(rows)
        return self.layout.counting(out)


def by_expert(recv: torch.Tensor) -> torch.Tensor:
    """The row order that turns rows received as (source, my expert) blocks into (my expert, source) blocks."""
    sizes = recv.flatten()
    starts = torch.cumsum(sizes, 0) - sizes                            # each (source, expert) block's first row
    blocks = starts.view(recv.shape).t().flatten(), recv.t().flatten()
    return torch.cat([torch.arange(s, s + n) for s, n in zip(*(b.tolist() for b in blocks), strict=True)]
                     or [torch.zeros(0, dtype=torch.long)])


# ---- gradients ----------------------------------------------------------------------------------
def reduce_grads(layout: ExpertLayout) -> None:
    """Once per step, after the last micro-batch: each expert gradient summed over the ranks holding the same
    experts, divided by the data-parallel degree (the average data parallelism takes of the rest). Under fsdp
    its reduce-scatter averaged over them (`shard`): times (dp / E) / dp."""
    grads = [p.grad.to_local() for p in layout.params if p.grad is not None]
    if not grads:
        return
    if layout.sharded:
        for g in grads:
            g.mul_(layout.same_size / layout.dp)
        return
    flat = compat.flatten(grads)
    if layout.same_size > 1:
        with prange("ep.allreduce"):
            dist.all_reduce(flat, group=layout.same_group)
    flat /= layout.dp
    for g, reduced in zip(grads, compat.unflatten(flat, grads), strict=True):
        g.copy_(reduced)


# ---- measured and predicted -------------------------------------------------------------------
def predicted_step_bytes(cfg, moe_layers: int, dp: int) -> int:
    """Bytes one rank hands to all_to_all_single in a dropless training step, on average over the ranks: each
    of its micro_batch x seq_len x top_k slots (d_model fp32 values) goes out in dispatch and back in combine,
    and its gradient both ways in backward: 4 x slots x d_model x 4 bytes per MoE layer and micro-batch; 6 x
    with model.activation_checkpointing (backward recomputes the forward, its all-to-alls too)."""
    m = cfg.model
    slots = cfg.micro_batch * m.seq_len * m.moe.top_k
    passes = 6 if m.activation_checkpointing != "none" else 4
    return passes * slots * m.d_model * 4 * moe_layers * cfg.accum_steps(dp)
