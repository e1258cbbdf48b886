"""`wb plan --validate`: the estimate (estimate.py) of published runs' own layouts, beside the figure they
published. Where the project's recipes cannot take the published layout exactly, the closest one is used
and the difference is said (`note`). The layouts' unpublished details (micro-batches) are assumptions."""

from __future__ import annotations

from dataclasses import dataclass

from gpu_workbench.parallel import recipes
from gpu_workbench.parallel.tools.plan import hardware
from gpu_workbench.parallel.tools.plan.estimate import EFFICIENCY, compute_seconds, estimate

LLAMA_405B = ["model.d_model=16384", "model.n_layers=126", "model.n_heads=128", "model.n_kv_heads=8",
              "model.d_ff=53248"]
# Megatron-LM's README scaling table, GPT with vocabulary 51200 and sequence 2048 (Narayanan et al. 2021)
GPT_18B = ["model.arch=gpt2", "model.vocab_size=51200", "model.seq_len=2048", "model.d_model=6144",
           "model.n_layers=40", "model.n_heads=48", "model.n_kv_heads=0", "model.d_ff=0", "model.tie_embeddings=true",
           "model.fused_head_loss=false", "model.activation_checkpointing=true"]


# Their H100s ran at 500 W with 2.4 TB/s HBM2e (peak FLOP/s between the SXM's and the NVL's, the file says);
# the H100 preset is the SXM's
TORCHTITAN = "torchtitan benchmarks/llama3_h100_202412_torchtitan.md"


@dataclass
class Case:
    name: str
    config: str
    gpus: int
    hw: str
    overrides: list[str]
    published: float
    unit: str          # "tokens/s/GPU" or "TFLOP/s/GPU" (Megatron's count, recomputation included)
    source: str
    note: str = ""


CASES = [
    Case("Llama 3.1 8B, 8 x H100, FSDP, bf16, compiled", "configs/llama-8b.toml", 8, "H100",
         ["recipe=fsdp", "global_batch=16", "micro_batch=2", "model.activation_checkpointing=selective"],
         6667, "tokens/s/GPU", TORCHTITAN + ", table 1",
         "local batch 2, global 16, selective activation checkpointing, as there"),
    Case("Llama 3.1 405B, 512 x H100, pp 8 x tp 8 x dp 8, 1F1B", "configs/llama-70b.toml", 512, "H100",
         [*LLAMA_405B, "recipe=pipeline", "pp.degree=8", "tp.degree=8", "pp.schedule=1f1b", "micro_batch=1",
          "pp.microbatches=32", "global_batch=256", "model.activation_checkpointing=true"],
         100, "tokens/s/GPU", TORCHTITAN + ", table 5",
         "dp 8 is FSDP there, replicas here (the pipeline recipe); local batch 32 as there, in micro-batches of 1 "
         "(torchtitan's default) assumed; no float8 or async TP here"),
    Case("Llama 3.1 405B, 512 x H100, pp 8 x tp 8 x dp 8, interleaved 1F1B", "configs/llama-70b.toml", 512, "H100",
         [*LLAMA_405B, "recipe=pipeline", "pp.degree=8", "tp.degree=8", "pp.schedule=interleaved-1f1b",
          "pp.virtual_stages=2", "micro_batch=1", "pp.microbatches=32", "global_batch=256",
          "model.activation_checkpointing=true"],
         128, "tokens/s/GPU", TORCHTITAN + ", table 5", "as above; 2 virtual stages per rank assumed"),
    Case("GPT 18B, 256 x A100, tp 8 x dp 32", "configs/llama-8b.toml", 256, "A100",
         [*GPT_18B, "recipe=ddp", "tp.degree=8", "global_batch=1024", "micro_batch=4", "precision=bf16"],
         135, "TFLOP/s/GPU", "Megatron-LM README scaling table (43% of peak)",
         "Megatron counts recomputed FLOPs; so does this row's estimate; micro-batch 4 assumed"),
]


def rows() -> list[dict]:
    """One row per case: the estimate, the published figure, their ratio."""
    from gpu_workbench.parallel import RunConfig

    out = []
    for case in CASES:
        cfg = RunConfig.from_toml(case.config, ["model.fused_head_loss=false", *case.overrides])
        dims = recipes.resolve(cfg, case.gpus)
        hw = hardware.PRESETS[case.hw]
        est = estimate(cfg, dims, hw)
        value = est.tokens_per_s_per_gpu
        if case.unit == "TFLOP/s/GPU":   # hardware FLOPs: the step's matmul work, recomputation included
            compute, _ = compute_seconds(cfg, dims, hw)
            value = compute / est.step_s * hw.peak_bf16_flops * EFFICIENCY / 1e12
        out.append({"case": case.name, "unit": case.unit, "estimate": value, "published": case.published,
                    "ratio": value / case.published, "mfu": est.mfu, "source": case.source, "note": case.note})
    return out
