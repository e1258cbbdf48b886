"""GPT-2: learned positions, LayerNorm, a GELU MLP 4 x d_model wide, biases, full multi-head attention."""

from __future__ import annotations

from gpu_workbench.parallel.models.spec import ArchSpec
from gpu_workbench.parallel.runtime.errors import UserError


def _check(m) -> None:
    if m.n_kv_heads and m.n_kv_heads != m.n_heads:
        raise UserError("model.n_kv_heads needs model.arch = 'llama' (gpt2 has full multi-head attention)")


SPEC = ArchSpec(name="gpt2", positions="learned", norm="layernorm", mlp="gelu", bias=True,
                default_d_ff=lambda m: 4 * m.d_model, check=_check)
