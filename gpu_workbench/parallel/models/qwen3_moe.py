"""Qwen3-MoE: qwen3's parts with the MLP of every model.moe.every-th block routed to model.moe.experts SwiGLU
experts (parallel/models/moe.py; softmax top-k, Hugging Face's norm_topk_prob as model.moe.norm_topk).
Hugging Face's Qwen3MoeForCausalLM through models/hf_llama.py."""

from __future__ import annotations

from gpu_workbench.parallel.models import hf_llama
from gpu_workbench.parallel.models.llama import SWIGLU_PLAN, default_d_ff
from gpu_workbench.parallel.models.llama import check as llama_check
from gpu_workbench.parallel.models.spec import ArchSpec
from gpu_workbench.parallel.runtime.errors import UserError


def check(m) -> None:
    llama_check(m)
    if not m.moe.experts:
        raise UserError("model.arch = 'qwen3_moe' needs model.moe.experts > 0 (or use model.arch = 'qwen3')")


SPEC = ArchSpec(name="qwen3_moe", positions="rotary", norm="rmsnorm", mlp="swiglu", grouped_query=True, qk_norm=True,
                default_d_ff=default_d_ff, check=check, mlp_plan=SWIGLU_PLAN,
                hf=hf_llama.adapter("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True),
                tensor_parallel="qwen3's per-head q/k norms are not split by tensor parallelism yet")
