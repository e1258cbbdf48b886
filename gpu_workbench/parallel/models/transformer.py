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

from gpu_workbench import kernels
from gpu_workbench.parallel import models
from gpu_workbench.parallel.config import ModelConfig
from gpu_workbench.parallel.models import moe, recompute
from gpu_workbench.parallel.runtime import documents


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention through the project's kernel (its torch backend is SDPA on CPU tensors); k and v
    may have fewer heads than q (grouped-query attention). data.document_mask: within each document only."""
    # a compiled block reads no context variable (train.compile refuses data.document_mask: documents.check)
    docs = None if torch.compiler.is_compiling() else documents.current()
    if docs is not None and q.shape[2] == k.shape[2] == docs.shape[1]:
        return kernels.document_attention(q, k, v, docs, causal=True)
    return kernels.attention(q, k, v, causal=True)


def d_ff(cfg: ModelConfig) -> int:
    """The MLP's hidden width: model.d_ff, or the architecture's default."""
    return models.get(cfg.arch).d_ff(cfg)


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads or cfg.n_heads


def fusable(*tensors: torch.Tensor) -> bool:
    """model.fused_kernels applies to plain tensors of one dtype; a DTensor (sequence parallelism's norms
    see sequence shards) or mixed dtypes take the eager formula, which is the same function."""
    return not any(isinstance(t, DTensor) for t in tensors) and len({t.dtype for t in tensors}) == 1


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 or wider (Llama's norm: no mean subtraction, no bias). `fused`:
    through kernels.rms_norm (model.fused_kernels)."""

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and fusable(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)
        h = x.to(torch.promote_types(x.dtype, torch.float32))   # fp32 for 16-bit inputs, float64 kept
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.type_as(x) * self.weight


def rope_frequencies(half: int, theta: float, dtype: torch.dtype, device, scaling: tuple = ()) -> torch.Tensor:
    """theta^(-2i/D) for the D/2 pairs; `scaling` (factor, low_freq_factor, high_freq_factor, original
    context): Llama 3.1's rescaling (rope_scaling type llama3), long wavelengths slowed by `factor`, short
    ones kept, a smooth blend between."""
    freq = theta ** (-torch.arange(half, device=device, dtype=dtype) / half)
    if not scaling:
        return freq
    factor, low, high, original = scaling
    wavelen = 2 * math.pi / freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * freq / factor + smooth * freq
    out = torch.where(wavelen > original / low, freq / factor, freq)
    middle = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(middle, blended, out)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float, scaling: tuple = ()) -> torch.Tensor:
    """Rotary position embedding of x (B, H, T, D) at `positions` (T,): dimension pair (2i, 2i+1) of the
    token at position p turned by the angle p * theta^(-2i/D), in fp32 or wider (the complex-number formulation of
    RoFormer and Llama, written with real arithmetic so DTensor and torch.compile need no complex dtype)."""
    half, dtype = x.shape[-1] // 2, torch.promote_types(x.dtype, torch.float32)   # float64 stays float64
    freq = rope_frequencies(half, theta, dtype, x.device, scaling)
    angle = positions.to(dtype)[:, None] * freq[None, :]   # (T, D/2)
    cos, sin = angle.cos(), angle.sin()
    pairs = x.to(dtype).unflatten(-1, (half, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def head_dim(cfg: ModelConfig) -> int:
    """Each head's width: model.head_dim, or d_model / n_heads (qwen3's may differ)."""
    return cfg.head_dim or cfg.d_model // cfg.n_heads


def rope_scaling(cfg: ModelConfig) -> tuple:
    """(factor, low, high, original context) of Llama 3.1's rescaling, or () where model.rope_scaling_factor = 0."""
    if not cfg.rope_scaling_factor:
        return ()
    return (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
            cfg.rope_original_max_positions)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = head_dim(cfg)
        spec = models.get(cfg.arch)
        self.rope_theta = cfg.rope_theta if spec.positions == "rotary" else None
        self.fused = cfg.fused_kernels   # rotary embedding through kernels.rope
        self.rope_scaling = rope_scaling(cfg)
        heads, kv, bias = cfg.n_heads * self.head_dim, kv_heads(cfg) * self.head_dim, spec.bias
        # Three projections, not one fused (3C, C): tensor parallelism shards each by rows, i.e. by whole
        # heads (docs/ARCHITECTURE.md, Tensor parallelism). Created in this order, their normal_ init draws
        # the same numbers as one fused weight did. No bias unless the architecture (qwen2) or a Hugging Face
        # checkpoint (gpt2) has one: a key bias gets an exactly-zero gradient (softmax ignores a per-query
        # shift), and Adam would turn the rounding noise in it into lr-sized steps.
        qkv_bias = spec.qkv_bias or cfg.qkv_bias
        self.q = nn.Linear(cfg.d_model, heads, bias=qkv_bias)
        self.k = nn.Linear(cfg.d_model, kv, bias=qkv_bias)
        self.v = nn.Linear(cfg.d_model, kv, bias=qkv_bias)
        self.proj = nn.Linear(heads, cfg.d_model, bias=bias)
        # qwen3: each head's q and k RMS-normalised (over head_dim) before the rotation
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if spec.qk_norm else None
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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            pos = torch.arange(T, device=x.device) if positions is None else positions
            if self.fused and not self.rope_scaling and fusable(q, k):   # kernels.rope has no llama3 rescaling
                q, k = kernels.rope(q, k, pos, self.rope_theta)   # interleaved pairs, as rotate
            else:
                q, k = (rotate(t, pos, self.rope_theta, self.rope_scaling) for t in (q, k))
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
        self.approximate = cfg.gelu_approximate   # "tanh": GPT-2's own gelu_new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Llama's MLP); the product through kernels.swiglu with
    model.fused_kernels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused = cfg.fused_kernels
        self.gate = nn.Linear(cfg.d_model, d_ff(cfg), bias=False)
        self.up = nn.Linear(cfg.d_model, d_ff(cfg), bias=False)
        self.down = nn.Linear(d_ff(cfg), cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate(x), self.up(x)
        return self.down(kernels.swiglu(gate, up) if self.fused and fusable(gate, up) else F.silu(gate) * up)


MLPS = {"gelu": MLP, "swiglu": SwiGLU}   # ArchSpec.mlp by name; an architecture may bring its own class


def norm(cfg: ModelConfig) -> nn.Module:
    if models.get(cfg.arch).norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps, cfg.fused_kernels)


def mlp(cfg: ModelConfig) -> nn.Module:
    kind = models.get(cfg.arch).mlp
    return MLPS[kind](cfg) if isinstance(kind, str) else kind(cfg)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.ln1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = norm(cfg)
        self.mlp = moe.MoE(cfg) if moe.is_moe_block(cfg, index) else mlp(cfg)   # model.moe: routed experts

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
        self.pos_emb = nn.Embedding(cfg.max_positions or cfg.seq_len, cfg.d_model) if learned else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
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
        mode = self.cfg.activation_checkpointing
        for i, block in enumerate(self.blocks):
            x = recompute.run_block(block, x, positions, mode, self.training, cache[i] if cache is not None else None)
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
        if targets is None:
            return self.logits(x)
        loss, aux = self.head_loss(x, targets), moe.aux_loss(self)
        return loss if aux is None else moe.add_aux(loss, aux)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood, the log-softmax through the project's kernel (fp32 under autocast).
    Vocabulary-parallel logits (a DTensor sharded on the vocabulary, parallel/primitives/tensor_parallel.py) go through
    torch's cross-entropy, which the caller's loss_parallel() turns into a sharded one."""
    if isinstance(logits, DTensor):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    logp = kernels.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).mean()


def build(cfg: ModelConfig, init: bool = True) -> GPT:
    """The model of architecture model.arch (the one place a model is built), on the CPU, initialised from the
    current torch seed; init=False: memory left uninitialised, for weights that a checkpoint fills next (a
    Hugging Face start: no seconds spent drawing a billion random numbers that are thrown away)."""
    models.get(cfg.arch)   # a UserError naming model.arch for an unknown architecture
    if init:
        return GPT(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:   # to_empty gives each module its own tensor: tie again
        model.head.weight = model.tok_emb.weight
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())   # parameters() yields a tied weight once


# Dense bf16 tensor-core peak per GPU, for MFU; extend as needed.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
                   "L40S": 362e12, "A10": 125e12, "L4": 121e12}
