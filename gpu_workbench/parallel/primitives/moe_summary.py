"""The summary's `moe` part (runtime/summary.py: MoeStats): every MoE layer's routed slots per expert summed
over the ranks (a tp group's ranks route the same tokens: counted once), the load imbalance, the dropped
slots; expert parallelism's all-to-all bytes of one training step beside expert_parallel.predicted_step_bytes;
the expert parameter bytes one rank holds beside the shapes' count / ep.degree (/ dp under fsdp). Collective."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from gpu_workbench.parallel.models.moe import MoE, expert_width
from gpu_workbench.parallel.primitives import expert_parallel
from gpu_workbench.parallel.primitives.tensor_parallel import local
from gpu_workbench.parallel.runtime.summary import MoeStats


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def part(model: nn.Module, cfg, dims, experts_layout=None) -> MoeStats | None:
    """The moe part of a run whose model (the unwrapped GPT) has MoE layers, else None."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not cfg.model.moe.experts or not layers:
        return None
    m = cfg.model
    counts = torch.stack([layer.stats.tokens for layer in layers])
    dropped = torch.tensor([layer.stats.dropped for layer in layers], dtype=torch.long)
    counts, dropped = _sum_over_ranks(counts) // dims.tp, _sum_over_ranks(dropped) // dims.tp
    mean = counts.double().mean(1).clamp(min=1e-12)
    held = sum(local(p).numel() * local(p).element_size() for layer in layers for p in layer.experts.parameters())
    split = dims.dp if experts_layout is not None and experts_layout.sharded else dims.ep   # fsdp: over all dp
    predicted = len(layers) * 3 * m.moe.experts * m.d_model * expert_width(m) * 4 // split
    out = MoeStats(moe_experts=m.moe.experts, moe_top_k=m.moe.top_k, ep_degree=dims.ep,
                   moe_tokens_per_expert=counts.tolist(),
                   moe_imbalance_max_over_mean=(counts.double().max(1).values / mean).tolist(),
                   moe_dropped=int(dropped.sum()), moe_expert_param_bytes_per_rank_measured=int(held),
                   moe_expert_param_bytes_per_rank_predicted=int(predicted))
    if experts_layout is not None and experts_layout.measured is not None:
        sent = _sum_over_ranks(torch.tensor(float(experts_layout.measured), dtype=torch.float64))
        out.ep_all_to_all_bytes_per_step_per_rank_measured = float(sent) / dims.world_size
        out.ep_all_to_all_bytes_per_step_per_rank_predicted = expert_parallel.predicted_step_bytes(
            cfg, len(layers), dims.dp)
    return out
