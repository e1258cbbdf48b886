"""A routed mixture-of-experts MLP (model.moe, docs/ARCHITECTURE.md, Mixture of experts): the SwiGLU MLP of
every model.moe.every-th block replaced by model.moe.experts SwiGLU experts, each token sent to its top_k.

    router      scores = softmax | sigmoid(x @ router), the top_k experts of each token, their scores
                normalised to sum to 1 (the token's weights)
    dispatch    the token slots (token, choice) sorted by expert: each expert's group is contiguous
    experts     one grouped SwiGLU over the groups (`self.experts`; expert parallelism swaps in the
                all-to-all version as `self.dispatch`, parallel/primitives/expert_parallel.py)
    combine     each token's outputs summed with its weights, plus the shared experts' MLP

Losses added to the training loss (GPT.forward): the load-balancing loss E * sum_e f_e * P_e (Switch
Transformer; f_e the fraction of slots routed to expert e, P_e its mean normalised score) times
aux_loss_coef, and the router z-loss mean(logsumexp(logits)^2) times z_loss_coef (ST-MoE). With
capacity_factor > 0, an expert takes at most ceil(factor * slots / experts) slots (the first tokens in
the micro-batch win); the rest are dropped (weight 0) and counted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from gpu_workbench import kernels


def is_moe_block(cfg, index: int) -> bool:
    """Block `index` (from 0) carries experts: every model.moe.every-th block, the last of each run of `every`."""
    m = cfg.moe
    return m.experts > 0 and (index + 1) % m.every == 0


def expert_width(cfg) -> int:
    """Each expert's hidden width: model.moe.d_ff, or the architecture's MLP width."""
    from gpu_workbench.parallel import models

    return cfg.moe.d_ff or models.get(cfg.arch).d_ff(cfg)


def grouped_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   counts: list[int]) -> torch.Tensor:
    """Expert e's SwiGLU on its rows of x (rows grouped by expert, counts[e] each), three grouped matmuls
    (kernels.grouped_matmul: Triton on CUDA tensors, a loop over the groups on CPU ones). `gate`, `up`:
    (E, C, F); `down`: (E, F, C)."""
    h = F.silu(kernels.grouped_matmul(x, gate, counts)) * kernels.grouped_matmul(x, up, counts)
    return kernels.grouped_matmul(h, down, counts)


class Experts(nn.Module):
    """model.moe.experts SwiGLU MLPs as three stacked weights (experts first: expert parallelism shards dim 0)."""

    def __init__(self, experts: int, d_model: int, width: int):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(experts, d_model, width))
        self.up = nn.Parameter(torch.empty(experts, d_model, width))
        self.down = nn.Parameter(torch.empty(experts, width, d_model))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert parallelism: the weights are DTensors of this rank's experts (counts: theirs only)."""
        w = [p.to_local() if isinstance(p, DTensor) else p for p in (self.gate, self.up, self.down)]
        return grouped_swiglu(x, *w, counts)


class MoEStats:
    """What the last forwards routed, summed until read (the summary's moe part): slots per expert, dropped."""

    def __init__(self, experts: int):
        self.tokens = torch.zeros(experts, dtype=torch.long, device="cpu")   # not meta under build(init=False)
        self.dropped = 0

    def add(self, counts: torch.Tensor, dropped: int) -> None:
        self.tokens += counts.detach().cpu()
        self.dropped += dropped


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.moe
        self.experts_n, self.top_k, self.score, self.norm_topk = m.experts, m.top_k, m.score, m.norm_topk
        self.aux_coef, self.z_coef, self.capacity_factor = m.aux_loss_coef, m.z_loss_coef, m.capacity_factor
        width = expert_width(cfg)
        self.router = nn.Linear(cfg.d_model, m.experts, bias=False)
        self.experts = Experts(m.experts, cfg.d_model, width)
        # shared experts: always on, one SwiGLU of shared_experts x the expert width
        self.shared = _SharedMLP(cfg.d_model, m.shared_experts * width) if m.shared_experts else None
        for p in self.experts.parameters():
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.experts.down, std=0.02 / math.sqrt(2 * cfg.n_layers))   # as GPT's residual outputs
        # (rows grouped by expert, rows per expert) -> outputs, or None for self.experts: expert parallelism
        # sets its all-to-all dispatch (parallel/primitives/expert_parallel.py)
        self.dispatch = None
        self.aux_loss: torch.Tensor | None = None   # this forward's weighted aux + z losses (GPT.forward adds it)
        self.routed: tuple | None = None   # this forward's (slots per expert, dropped), taken into stats with it
        self.stats = MoEStats(m.experts)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (N, k): the chosen scores, normalised unless norm_topk is off; experts (N, k); each token's
        normalised scores over all experts (N, E))."""
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        top, chosen = scores.topk(self.top_k, dim=-1)
        probs = scores if self.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        return (top / top.sum(-1, keepdim=True) if self.norm_topk else top), chosen, probs

    def losses(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """aux_loss_coef x load balance + z_loss_coef x router z-loss, over this micro-batch's tokens."""
        f = counts.to(probs.dtype) / counts.sum().clamp(min=1)
        balance = self.experts_n * (f * probs.mean(0)).sum() if probs.shape[0] else probs.sum()
        z = torch.logsumexp(logits, -1).pow(2).mean() if logits.shape[0] else logits.sum()
        return self.aux_coef * balance + self.z_coef * z

    def keep(self, expert_of_slot: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """Which sorted slots an expert has room for (capacity_factor > 0), or None (dropless)."""
        if not self.capacity_factor:
            return None
        capacity = math.ceil(self.capacity_factor * expert_of_slot.numel() / self.experts_n)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(expert_of_slot.numel(), device=counts.device) - starts[expert_of_slot]
        return rank_in_expert < capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, h = x.shape, x.reshape(-1, x.shape[-1])
        logits = self.router(h)
        weights, chosen, probs = self.route(logits)
        flat = chosen.flatten()                                  # slot j = token j // k, its (j % k)-th choice
        order = torch.argsort(flat, stable=True)                 # slots grouped by expert, token order within
        counts = torch.bincount(flat, minlength=self.experts_n)
        self.aux_loss = self.losses(logits, probs, counts)
        slot_weight = weights.flatten()[order]
        keep = self.keep(flat[order], counts)
        if keep is not None:   # dropped slots leave the groups: the experts never see them
            order, slot_weight = order[keep], slot_weight[keep]
            kept = torch.bincount(flat[order], minlength=self.experts_n)
            self.routed = (kept, int(counts.sum() - kept.sum()))
            counts = kept
        else:
            self.routed = (counts, 0)
        token = order // self.top_k
        ys = (self.dispatch or self.experts)(h[token], counts.tolist())
        out = torch.zeros_like(h).index_add_(0, token, ys * slot_weight.unsqueeze(-1).to(ys.dtype))
        if self.shared is not None:
            out = out + self.shared(h)
        return out.reshape(shape)


class _SharedMLP(nn.Module):
    """The shared experts: a SwiGLU every token goes through (DeepSeek-MoE)."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.gate = nn.Linear(d_model, width, bias=False)
        self.up = nn.Linear(d_model, width, bias=False)
        self.down = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the MoE layers' aux losses of the last forward, or None without experts; their routing
    goes into their stats here, once per forward (activation checkpointing's recompute in backward routes
    again, and is not counted twice)."""
    losses = []
    for m in model.modules():
        if isinstance(m, MoE) and m.aux_loss is not None:
            losses.append(m.aux_loss)
            m.stats.add(*m.routed)
            m.aux_loss = m.routed = None   # taken once: the graph is not held past its step
    return torch.stack(losses).sum() if losses else None


def add_aux(loss: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """The training loss plus the routers' losses; a vocabulary-parallel loss (a replicated DTensor under
    tensor parallelism) takes them as a replicated DTensor on its mesh."""
    if isinstance(loss, DTensor):
        aux = DTensor.from_local(aux.to(loss.dtype), loss.device_mesh, loss.placements, run_check=False)
    return loss + aux.to(loss.dtype)
