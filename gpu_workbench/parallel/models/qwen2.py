"""Qwen2: llama's parts (rotary, RMSNorm, SwiGLU, grouped-query attention) with biases on q, k and v.
Hugging Face's Qwen2ForCausalLM through models/hf_llama.py."""

from __future__ import annotations

from gpu_workbench.parallel.models import hf_llama
from gpu_workbench.parallel.models.llama import SWIGLU_PLAN, check, default_d_ff
from gpu_workbench.parallel.models.spec import ArchSpec

SPEC = ArchSpec(name="qwen2", positions="rotary", norm="rmsnorm", mlp="swiglu", grouped_query=True, qkv_bias=True,
                default_d_ff=default_d_ff, check=check, mlp_plan=SWIGLU_PLAN,
                hf=hf_llama.adapter("qwen2", "Qwen2ForCausalLM", qkv_bias=True))
