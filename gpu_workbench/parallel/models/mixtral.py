"""Mixtral: llama's parts with every block's MLP routed to model.moe.experts SwiGLU experts (parallel/models/moe.py;
softmax top-k, the chosen weights normalised, as Mixtral always does). Hugging Face's MixtralForCausalLM through
models/hf_llama.py (its `block_sparse_moe` names)."""

from __future__ import annotations

from gpu_workbench.parallel.models import hf_llama
from gpu_workbench.parallel.models.llama import SWIGLU_PLAN, default_d_ff, routed_check
from gpu_workbench.parallel.models.spec import ArchSpec

SPEC = ArchSpec(name="mixtral", positions="rotary", norm="rmsnorm", mlp="swiglu", grouped_query=True,
                default_d_ff=default_d_ff, check=routed_check("llama"), mlp_plan=SWIGLU_PLAN,
                hf=hf_llama.adapter("mixtral", "MixtralForCausalLM"))
