"""The MoE layer under expert parallelism on the CPU: one torchrun launch (2 ranks, ddp) trains the same llama
MoE with ep.degree=1 (every rank all 8 experts) and ep.degree=2 (4 each, tokens exchanged by all-to-all), both
with the timeline on. Reported side by side (pytest-benchmark's extra_info, and printed): the step time of
each, their ratio, and the all-to-all share of the ep=2 step from the timeline (the `alltoall` spans, forward
and backward, over the `step` spans; the first step left out). The benchmark itself times one MoE layer's
forward + backward in this process. `make bench` only (marked timing): never in `make test`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.models.moe import MoE
from tests.helpers.runs import TINY, summary, torchrun

pytestmark = pytest.mark.timing

MODEL = ["model.arch=llama", "model.d_model=128", "model.n_heads=4", "model.n_layers=2", "model.seq_len=64",
         "model.moe.experts=8", "model.moe.top_k=2"]
RUN = [*MODEL, "recipe=ddp", "steps=8", "global_batch=16", "micro_batch=4", "progress=false", "checkpoint.every=0",
       "profiling.timeline=true"]


def span_ms(run: Path, name: str, skip_first_step: bool = True) -> float:
    """Milliseconds of the `name` spans on rank 0's timeline after its first step."""
    spans = json.loads((run / "timeline" / "timeline-rank0.json").read_text())["spans"]
    steps = sorted((s for s in spans if s["name"] == "step"), key=lambda s: s["start_ns"])
    after = steps[1]["start_ns"] if skip_first_step and len(steps) > 1 else 0
    return sum(s["end_ns"] - s["start_ns"] for s in spans if s["name"] == name and s["start_ns"] >= after) / 1e6


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe_bench")
    torchrun(2, [(TINY, [*RUN, f"ep.degree={e}", f"run_dir={root / f'ep{e}'}"]) for e in (1, 2)], timeout=900)
    out = {}
    for e in (1, 2):
        run = root / f"ep{e}"
        out[f"ep{e}_step_ms"] = span_ms(run, "step") / 7
        out[f"ep{e}_alltoall_ms_per_step"] = span_ms(run, "alltoall") / 7
        out[f"ep{e}_tokens_per_s"] = summary(run)["tokens_per_s"]
    out["step_time_ep2_over_ep1"] = out["ep2_step_ms"] / out["ep1_step_ms"]
    out["alltoall_share_of_ep2_step"] = out["ep2_alltoall_ms_per_step"] / out["ep2_step_ms"]
    out["ep2_alltoall_bytes_per_step_per_rank"] = summary(root / "ep2")[
        "ep_all_to_all_bytes_per_step_per_rank_measured"]
    print(json.dumps(out, indent=1))
    return out


def test_moe_layer_step_cpu(benchmark, figures):
    benchmark.group = "MoE layer (8 experts, top-2, d_model 128), forward + backward, fp32"
    benchmark.extra_info.update(figures)
    cfg = RunConfig.from_toml(TINY, MODEL).model
    torch.set_num_threads(1)   # as a torchrun worker (OMP_NUM_THREADS=1): on a busy 2-core box more threads thrash
    torch.manual_seed(0)
    layer, x = MoE(cfg), torch.randn(4, 64, 128)

    def step():
        out = layer(x)
        (out.sum() + layer.aux_loss).backward()

    benchmark(step)
    assert figures["ep1_alltoall_ms_per_step"] == 0 and figures["alltoall_share_of_ep2_step"] > 0
