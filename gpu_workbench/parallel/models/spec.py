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
    grouped_query: bool = False              # model.n_kv_heads < n_heads allowed
    # tensor parallelism of the MLP's Linears: "colwise" (split the output) or "rowwise" (split the input)
    mlp_plan: dict[str, str] = field(default_factory=lambda: {"up": "colwise", "down": "rowwise"})
    check: Callable[[Any], None] = no_checks  # the architecture's own config checks (UserError)
    hf: Any = None   # the Hugging Face checkpoint adapter (names, q/k permutation, config mapping): not yet

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
        attention = 2 * c * c + 2 * c * (c // m.n_heads) * (m.n_kv_heads or m.n_heads)
        split_biases = f * sum(kind == "colwise" for kind in self.mlp_plan.values()) if self.bias else 0
        return attention + len(self.mlp_plan) * c * f + split_biases

    def replicated_per_block(self, m) -> int:
        """A block's parameters every TP rank holds whole: two norms, and the row-parallel outputs' biases."""
        rowwise = sum(kind == "rowwise" for kind in self.mlp_plan.values())
        return 2 * self.norm_params(m) + ((1 + rowwise) * m.d_model if self.bias else 0)

    def position_params(self, m) -> int:
        return m.seq_len * m.d_model if self.positions == "learned" else 0

    def n_params(self, m) -> int:
        """Every parameter of the model, a tied head counted once."""
        blocks = m.n_layers * (self.sharded_per_block(m) + self.replicated_per_block(m))
        vocab = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
        return blocks + vocab + self.position_params(m) + self.norm_params(m)

    def flops_per_token(self, m) -> float:
        """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus causal attention's scores
        and weighted sum, 6 x layers x seq_len x d_model (the PaLM appendix count, halved for causal)."""
        return 6.0 * self.n_params(m) + 6.0 * m.n_layers * m.seq_len * m.d_model
