"""Qwen3-MoE: qwen3's parts with the MLP of every model.moe.every-th block routed to model.moe.experts SwiGLU
experts (parallel/models/moe.py; softmax top-k, Hugging Face's norm_topk_prob as model.moe.norm_topk).
Hugging Face's Qwen3MoeForCausalLM through models/hf_llama.py."""

from __future__ import annotations

from gpu_workbench.parallel.models import hf_llama
from gpu_workbench.parallel.models.llama import SWIGLU_PLAN, default_d_ff, routed_check
from gpu_workbench.parallel.models.spec import ArchSpec

SPEC = ArchSpec(name="qwen3_moe", positions="rotary", norm="rmsnorm", mlp="swiglu", grouped_query=True, qk_norm=True,
                default_d_ff=default_d_ff, check=routed_check("qwen3"), mlp_plan=SWIGLU_PLAN,
                hf=hf_llama.adapter("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True),
                tensor_parallel="qwen3's per-head q/k norms are not split by tensor parallelism yet")
