"""`wb plan`: hardware presets and files (a missing field named), layouts that fit ranked with their commands,
the memory check (a smaller GPU drops layouts), and --validate's rows beside the published figures."""

from __future__ import annotations

import json

import pytest

from gpu_workbench.parallel.tools.plan import hardware
from tests.helpers.cli import ROOT

LLAMA_8B = str(ROOT / "configs" / "llama-8b.toml")


def test_hardware_file_missing_a_field_is_named(tmp_path, cli):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"peak_bf16_flops": 1e15, "hbm_gb_s": 3000, "intra_node_gb_s": 400}))
    done = cli("plan", "--config", LLAMA_8B, "--gpus", "8", "--hardware", str(path))
    assert done.returncode == 2
    assert done.stderr.strip() == f"wb: error: --hardware {path}: missing field inter_node_gb_s (needs " \
                                  "peak_bf16_flops, hbm_gb_s, intra_node_gb_s, inter_node_gb_s)"


def test_hardware_file_loads(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("peak_bf16_flops = 5e14\nhbm_gb_s = 2000\nintra_node_gb_s = 200\ninter_node_gb_s = 25\n"
                    "gpus_per_node = 4\n")
    hw = hardware.load(str(path))
    assert (hw.name, hw.gpus_per_node, hw.peak_bf16_flops) == ("mine", 4, 5e14)
    assert hardware.load("h100") is hardware.PRESETS["H100"]


def test_plan_ranks_layouts_that_fit_with_their_commands(cli):
    done = cli("plan", "--config", LLAMA_8B, "--gpus", "8", "--gpu-memory", "80GB", "--top", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"plan: {LLAMA_8B} on 8 x H100 (80 GB):") and "layouts fit" in lines[0]
    commands = [line.strip() for line in lines if line.strip().startswith("wb train --nproc 8")]
    assert len(commands) == 2 and all("recipe=" in c for c in commands)
    rates = [float(line.split(": ")[1].split(" tokens")[0].replace(",", "")) for line in lines
             if "tokens/s/GPU" in line]
    assert rates == sorted(rates, reverse=True)


def test_less_memory_fits_fewer_layouts():
    from gpu_workbench.parallel.tools.plan.layouts import candidates

    big, _, _ = candidates(LLAMA_8B, [], 8, 80e9)
    small, _, too_big = candidates(LLAMA_8B, [], 8, 24e9)
    assert 0 < len(small) < len(big) and too_big > 0
    assert all(c.memory_bytes <= 24e9 * 0.9 for c in small)


def test_validate_prints_each_published_run(cli):
    done = cli("plan", "--validate")
    assert done.returncode == 0, done.stderr
    for name in ("Llama 3.1 8B, 8 x H100", "405B", "GPT 18B"):
        assert name in done.stdout
    assert "6,667" in done.stdout and "ratio" in done.stdout


def test_selective_checkpointing_costs_between_none_and_full():
    """selective recomputes half the blocks' matmuls and keeps attention: more than none, under half of full."""
    from gpu_workbench.parallel import RunConfig, recipes
    from gpu_workbench.parallel.tools.plan.estimate import compute_seconds

    def seconds(mode: str) -> float:
        cfg = RunConfig.from_toml(LLAMA_8B, [f"model.activation_checkpointing={mode}"])
        return compute_seconds(cfg, recipes.resolve(cfg, 8), hardware.PRESETS["H100"])[0]

    none, selective, full = map(seconds, ("none", "selective", "full"))
    assert none < selective < none + (full - none) / 2


def test_experts_add_ep_layouts_that_split_the_experts():
    """A model with experts: layouts with ep.degree > 1; under ddp each rank then holds 1/ep of the routed experts
    (fsdp shards them over every dp rank either way, and gathers 1/ep as many); the tokens' all-to-alls cost time."""
    from gpu_workbench.parallel import RunConfig, recipes
    from gpu_workbench.parallel.tools.plan.estimate import estimate
    from gpu_workbench.parallel.tools.plan.layouts import candidates, state_bytes

    moe = ["model.moe.experts=8", "model.moe.top_k=2", "global_batch=64"]
    fits, _, _ = candidates(LLAMA_8B, moe, 64, 80e9)
    assert any("ep.degree=8" in c.overrides for c in fits)
    hw = hardware.PRESETS["H100"]

    def layout(recipe: str, ep: int):
        cfg = RunConfig.from_toml(LLAMA_8B, [*moe, f"recipe={recipe}", f"ep.degree={ep}",
                                             "model.fused_head_loss=false"])
        dims = recipes.resolve(cfg, 64)
        return state_bytes(cfg, dims), estimate(cfg, dims, hw).parts

    (ddp1, _), (ddp8, _) = layout("ddp", 1), layout("ddp", 8)
    (fsdp1, parts1), (fsdp8, parts8) = layout("fsdp", 1), layout("fsdp", 8)
    assert ddp8 < ddp1 and fsdp8 == fsdp1
    assert parts1["ep"] == 0 < parts8["ep"] and parts8["dp"] < parts1["dp"]


@pytest.mark.parametrize("text", ["80", "80GB", "80 GiB"])
def test_gpu_memory_parses(text):
    from gpu_workbench.cli.plan_cli import _memory

    assert _memory(text) in (80e9, 80 * 2**30)
