"""What an architecture is to the rest of the project (docs/ARCHITECTURE.md, The model): which parts the
shared decoder (parallel/models/transformer.py) is built from, how tensor parallelism splits its MLP, its parameter and
FLOP counts from the shapes alone, its own config checks, and a slot for its checkpoint adapters. One
instance per architecture, in a file of its own beside this one. Torch-free: config checks read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


def no_checks(m) -> None:
    """An architecture without config checks of its own."""


@dataclass(frozen=True)
class ArchSpec:
    name: str
    positions: Literal["learned", "rotary"]   # a position table added to the embedding, or q/k rotated
    norm: Literal["layernorm", "rmsnorm"]
    # the block's MLP: a name in model.MLPS ("gelu": up/down, "swiglu": gate/up/down), or a class of the
    # architecture's own taking the ModelConfig
    mlp: str | Callable[[Any], Any]
    default_d_ff: Callable[[Any], int]       # the MLP width when model.d_ff = 0
    bias: bool = False                       # biases on attn.proj and the MLP's Linears
    qkv_bias: bool = False                   # biases on q, k, v (qwen2; model.qkv_bias adds them elsewhere)
    qk_norm: bool = False                    # per-head RMSNorm of q and k before the rotation (qwen3)
    grouped_query: bool = False              # model.n_kv_heads < n_heads allowed
    # tensor parallelism of the MLP's Linears: "colwise" (split the output) or "rowwise" (split the input)
    mlp_plan: dict[str, str] = field(default_factory=lambda: {"up": "colwise", "down": "rowwise"})
    check: Callable[[Any], None] = no_checks  # the architecture's own config checks (UserError)
    # the Hugging Face checkpoint adapter (models/hf_adapter.py: names, q/k permutation, config mapping)
    hf: Any = None
    tensor_parallel: str | None = None        # None where tp.degree > 1 is supported, else why not

    def d_ff(self, m) -> int:
        return m.d_ff or self.default_d_ff(m)

    # ---- counts from the shapes ---------------------------------------------------------------
    def norm_params(self, m) -> int:
        """One norm's parameters: LayerNorm's weight and bias, RMSNorm's weight."""
        return (2 if self.norm == "layernorm" else 1) * m.d_model

    def sharded_per_block(self, m) -> int:
        """A block's parameters tensor parallelism splits: q, k, v, proj weights, the MLP's matrices, and
        the column-parallel MLP Linears' biases."""
        c, f = m.d_model, self.d_ff(m)
        q, kv = self.q_width(m), 2 * (m.head_dim or c // m.n_heads) * (m.n_kv_heads or m.n_heads)
        attention = 2 * c * q + c * kv + ((q + kv) if self.qkv_bias or m.qkv_bias else 0)
        split_biases = f * sum(kind == "colwise" for kind in self.mlp_plan.values()) if self.bias else 0
        return attention + len(self.mlp_plan) * c * f + split_biases

    @staticmethod
    def q_width(m) -> int:
        """n_heads x head_dim: the query projection's outputs (d_model unless model.head_dim says)."""
        return m.n_heads * (m.head_dim or m.d_model // m.n_heads)

    def replicated_per_block(self, m) -> int:
        """A block's parameters every TP rank holds whole: two norms, and the row-parallel outputs' biases."""
        rowwise = sum(kind == "rowwise" for kind in self.mlp_plan.values())
        qk_norms = 2 * (m.head_dim or m.d_model // m.n_heads) if self.qk_norm else 0
        return 2 * self.norm_params(m) + ((1 + rowwise) * m.d_model if self.bias else 0) + qk_norms

    def position_params(self, m) -> int:
        return (m.max_positions or m.seq_len) * m.d_model if self.positions == "learned" else 0

    # ---- mixture of experts (model.moe, parallel/models/moe.py) ---------------------------------
    @staticmethod
    def moe_blocks(m) -> int:
        """Blocks whose MLP is routed experts: every model.moe.every-th."""
        return m.n_layers // m.moe.every if m.moe.experts else 0

    def dense_mlp_params(self, m) -> int:
        """One dense MLP's matrices (and its column-parallel biases): what a MoE block has instead."""
        f = self.d_ff(m)
        return len(self.mlp_plan) * m.d_model * f + (f * sum(k == "colwise" for k in self.mlp_plan.values())
                                                     if self.bias else 0)

    def expert_params(self, m) -> int:
        """One expert's SwiGLU: gate, up (C x F) and down (F x C), F = model.moe.d_ff or the MLP width."""
        return 3 * m.d_model * (m.moe.d_ff or self.d_ff(m))

    def moe_block_params(self, m) -> int:
        """A MoE block's MLP: the router, the routed experts and the shared experts' SwiGLU."""
        e = m.moe
        return m.d_model * e.experts + (e.experts + e.shared_experts) * self.expert_params(m)

    def n_params(self, m) -> int:
        """Every parameter of the model, a tied head counted once."""
        blocks = m.n_layers * (self.sharded_per_block(m) + self.replicated_per_block(m))
        blocks += self.moe_blocks(m) * (self.moe_block_params(m) - self.dense_mlp_params(m))
        vocab = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
        return blocks + vocab + self.position_params(m) + self.norm_params(m)

    def flops_per_token(self, m) -> float:
        """Training FLOPs per token: 6 per parameter a token goes through (forward 2, backward 4: a MoE block's
        top_k routed experts, not all) plus causal attention's scores and weighted sum, 6 x layers x seq_len x
        d_model (the PaLM appendix count, halved for causal)."""
        idle = self.moe_blocks(m) * (m.moe.experts - m.moe.top_k) * self.expert_params(m)
        return 6.0 * (self.n_params(m) - idle) + 6.0 * m.n_layers * m.seq_len * m.d_model
