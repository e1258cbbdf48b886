"""Llama: rotary positions (interleaved pairs, Meta's convention), RMSNorm, a SwiGLU MLP about 8/3 x
d_model wide (rounded up to a multiple of 8, so its three matrices hold about as many parameters as
gpt2's two), no biases, grouped-query attention."""

from __future__ import annotations

from gpu_workbench.parallel.models.spec import ArchSpec
from gpu_workbench.parallel.runtime.errors import UserError


def _check(m) -> None:
    if (m.d_model // m.n_heads) % 2:
        raise UserError(f"model.d_model / model.n_heads ({m.d_model // m.n_heads}) must be even with "
                        f"model.arch = 'llama': rotary embeddings rotate pairs of dimensions")


SPEC = ArchSpec(name="llama", positions="rotary", norm="rmsnorm", mlp="swiglu", grouped_query=True,
                default_d_ff=lambda m: -(-8 * m.d_model // 3 // 8) * 8, check=_check,
                mlp_plan={"gate": "colwise", "up": "colwise", "down": "rowwise"})
