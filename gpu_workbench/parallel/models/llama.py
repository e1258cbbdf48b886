"""Llama: rotary positions (interleaved pairs, Meta's convention), RMSNorm, a SwiGLU MLP about 8/3 x
d_model wide (rounded up to a multiple of 8, so its three matrices hold about as many parameters as
gpt2's two), no biases, grouped-query attention. Hugging Face's LlamaForCausalLM through models/hf_llama.py."""

from __future__ import annotations

from gpu_workbench.parallel.models import hf_llama
from gpu_workbench.parallel.models.spec import ArchSpec
from gpu_workbench.parallel.runtime.errors import UserError


def check(m) -> None:
    """The llama family's checks (qwen2 and qwen3 share them)."""
    head_dim = m.head_dim or m.d_model // m.n_heads
    if head_dim % 2:
        raise UserError(f"model.d_model / model.n_heads or model.head_dim ({head_dim}) must be even with "
                        f"model.arch = '{m.arch}': rotary embeddings rotate pairs of dimensions")


def routed_check(dense: str):
    """The check of a routed architecture (qwen3_moe, mixtral): the family's, and experts to route to; `dense` is
    the architecture without them."""
    def check_routed(m) -> None:
        check(m)
        if not m.moe.experts:
            raise UserError(f"model.arch = '{m.arch}' needs model.moe.experts > 0 (or use model.arch = '{dense}')")

    return check_routed


def default_d_ff(m) -> int:
    return -(-8 * m.d_model // 3 // 8) * 8


SWIGLU_PLAN = {"gate": "colwise", "up": "colwise", "down": "rowwise"}

SPEC = ArchSpec(name="llama", positions="rotary", norm="rmsnorm", mlp="swiglu", grouped_query=True,
                default_d_ff=default_d_ff, check=check, mlp_plan=SWIGLU_PLAN,
                hf=hf_llama.adapter("llama", "LlamaForCausalLM"))
