"""Qwen3: llama's parts with a per-head RMSNorm of q and k before the rotation, and a head width
(model.head_dim) independent of d_model / n_heads. Hugging Face's Qwen3ForCausalLM through models/hf_llama.py."""

from __future__ import annotations

from gpu_workbench.parallel.models import hf_llama
from gpu_workbench.parallel.models.llama import SWIGLU_PLAN, check, default_d_ff
from gpu_workbench.parallel.models.spec import ArchSpec

SPEC = ArchSpec(name="qwen3", positions="rotary", norm="rmsnorm", mlp="swiglu", grouped_query=True, qk_norm=True,
                default_d_ff=default_d_ff, check=check, mlp_plan=SWIGLU_PLAN,
                hf=hf_llama.adapter("qwen3", "Qwen3ForCausalLM", qk_norm=True),
                # q_norm/k_norm would see only this rank's heads: their gradients would need a sum over tp
                tensor_parallel="qwen3's per-head q/k norms are not split by tensor parallelism yet")
