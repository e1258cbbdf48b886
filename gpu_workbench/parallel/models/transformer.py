"""The decoder every architecture shares: token embedding (+ a learned position table, or rotary positions
inside attention), pre-norm blocks, final norm, linear head. Which parts an architecture takes is its
ArchSpec's (parallel/models/, model.arch); this file tests no architecture by name.

The blocks live in `model.blocks` (an nn.ModuleList) so a pipeline recipe can split them by index;
`embed`, `blocks` and `head_loss` are the three pieces a stage needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from gpu_workbench import kernels
from gpu_workbench.parallel import models
from gpu_workbench.parallel.config import ModelConfig


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention through the project's kernel (its torch backend is SDPA on CPU tensors); k and v
    may have fewer heads than q (grouped-query attention)."""
    return kernels.attention(q, k, v, causal=True)


def d_ff(cfg: ModelConfig) -> int:
    """The MLP's hidden width: model.d_ff, or the architecture's default."""
    return models.get(cfg.arch).d_ff(cfg)


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads or cfg.n_heads


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 or wider (Llama's norm: no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))   # fp32 for 16-bit inputs, float64 kept
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.type_as(x) * self.weight


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of x (B, H, T, D) at `positions` (T,): dimension pair (2i, 2i+1) of the
    token at position p turned by the angle p * theta^(-2i/D), in fp32 or wider (the complex-number formulation of
    RoFormer and Llama, written with real arithmetic so DTensor and torch.compile need no complex dtype)."""
    half, dtype = x.shape[-1] // 2, torch.promote_types(x.dtype, torch.float32)   # float64 stays float64
    freq = theta ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
    angle = positions.to(dtype)[:, None] * freq[None, :]   # (T, D/2)
    cos, sin = angle.cos(), angle.sin()
    pairs = x.to(dtype).unflatten(-1, (half, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_heads
        spec = models.get(cfg.arch)
        self.rope_theta = cfg.rope_theta if spec.positions == "rotary" else None
        kv, bias = kv_heads(cfg) * self.head_dim, spec.bias
        # Three projections, not one fused (3C, C): tensor parallelism shards each by rows, i.e. by whole
        # heads (docs/ARCHITECTURE.md, Tensor parallelism). Created in this order, their normal_ init draws
        # the same numbers as one fused weight did. No bias: a key bias gets an exactly-zero gradient
        # (softmax ignores a per-query shift), and Adam would turn the rounding noise in it into lr-sized steps.
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k = nn.Linear(cfg.d_model, kv, bias=False)
        self.v = nn.Linear(cfg.d_model, kv, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        # (q, k, v) -> out, causal; context parallelism swaps in ring attention
        # (parallel/primitives/context_parallel.py)
        self.attend = attention

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        """`cache`: the keys and values of the tokens before these (decoding, parallel/tools/sampling.py); the
        new ones are appended, and the bottom-right causal mask lets each new query see all of them."""
        B, T, _ = x.shape
        # -1 heads: all of them, or this rank's share under tensor parallelism (q/k/v column-sharded)
        q, k, v = (lin(x).view(B, T, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        if self.rope_theta is not None:
            pos = torch.arange(T, device=x.device) if positions is None else positions
            q, k = rotate(q, pos, self.rope_theta), rotate(k, pos, self.rope_theta)
        if cache is not None:
            k, v = cache.extend(k, v)
        y = self.attend(q, k, v).transpose(1, 2).reshape(B, T, -1)
        return self.proj(y)


class LayerCache:
    """One block's keys and values (B, Hkv, tokens so far, head_dim), grown by each decoding step."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class MLP(nn.Module):
    """down(gelu(up(x))), with biases where the architecture has them (GPT-2's MLP)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = models.get(cfg.arch).bias
        self.up = nn.Linear(cfg.d_model, d_ff(cfg), bias=bias)
        self.down = nn.Linear(d_ff(cfg), cfg.d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Llama's MLP)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, d_ff(cfg), bias=False)
        self.up = nn.Linear(cfg.d_model, d_ff(cfg), bias=False)
        self.down = nn.Linear(d_ff(cfg), cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


MLPS = {"gelu": MLP, "swiglu": SwiGLU}   # ArchSpec.mlp by name; an architecture may bring its own class


def norm(cfg: ModelConfig) -> nn.Module:
    if models.get(cfg.arch).norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


def mlp(cfg: ModelConfig) -> nn.Module:
    kind = models.get(cfg.arch).mlp
    return MLPS[kind](cfg) if isinstance(kind, str) else kind(cfg)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = norm(cfg)
        self.mlp = mlp(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), positions, cache=cache)   # a keyword: TP input plans see (x, positions)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """The decoder of every architecture (model.arch); parameter names are shared where the parts are."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # rotary positions: no table, the positions rotate q and k inside attention
        learned = models.get(cfg.arch).positions == "learned"
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if learned else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)
        for name, p in self.named_parameters():   # GPT-2: scale residual projections by depth
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """`positions`: each token's index in its sequence (default 0..T-1); a context-parallel rank holds
        other positions than its first T."""
        if self.pos_emb is None:
            return self.tok_emb(idx)
        pos = torch.arange(idx.shape[1], device=idx.device) if positions is None else positions
        return self.tok_emb(idx) + self.pos_emb(pos)

    def run_blocks(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                   cache: list[LayerCache] | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, positions, use_reentrant=False)   # recompute in backward
            else:
                x = block(x, positions, cache=cache[i] if cache is not None else None)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.cfg.fused_head_loss:   # the same mean loss, the (tokens, vocab) logits never held
            h, w = self.ln_f(x), self.head.weight
            if torch.is_autocast_enabled(h.device.type):   # the head's matmul in the autocast dtype, as nn.Linear's
                dtype = torch.get_autocast_dtype(h.device.type)
                h, w = h.to(dtype), w.to(dtype)
            return kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1)).float()
        return cross_entropy(self.logits(x), targets)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: list[LayerCache] | None = None) -> torch.Tensor:
        """Mean next-token loss when targets are given, else the logits. `positions`: see embed; `cache`:
        one LayerCache per block (decoding; `positions` then continue the cached tokens')."""
        x = self.run_blocks(self.embed(idx, positions), positions, cache)
        return self.logits(x) if targets is None else self.head_loss(x, targets)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood, the log-softmax through the project's kernel (fp32 under autocast).
    Vocabulary-parallel logits (a DTensor sharded on the vocabulary, parallel/primitives/tensor_parallel.py) go through
    torch's cross-entropy, which the caller's loss_parallel() turns into a sharded one."""
    if isinstance(logits, DTensor):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    logp = kernels.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).mean()


def build(cfg: ModelConfig) -> GPT:
    """The model of architecture model.arch (the one place a model is built), on the CPU, initialised from the
    current torch seed."""
    models.get(cfg.arch)   # a UserError naming model.arch for an unknown architecture
    return GPT(cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())   # parameters() yields a tied weight once


# Dense bf16 tensor-core peak per GPU, for MFU; extend as needed.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
                   "L40S": 362e12, "A10": 125e12, "L4": 121e12}
