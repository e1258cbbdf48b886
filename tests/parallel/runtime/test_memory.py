"""Model-state bytes each rank actually holds vs the ZeRO paper's formula, on 2 ranks, >= 1M params."""

from __future__ import annotations

import pytest

from tests.helpers.runs import BASE, TINY, summary
from tests.parallel.conftest import DP_RECIPES, MEMORY_RECIPES

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("recipe", MEMORY_RECIPES)
def test_measured_within_10pct_of_formula(recipe, precision, dp_runs):
    s = summary(dp_runs[recipe, precision])
    assert s["n_params"] >= 1_000_000
    measured, predicted = s["model_state_bytes_per_rank"], s["predicted_model_state_bytes_per_rank"]
    assert abs(measured - predicted) <= 0.10 * predicted, (
        f"{recipe} {precision}: measured {measured} vs {s['predicted_formula']} = {predicted}: "
        f"{s['model_state_bytes_by_rank']}")


def test_fsdp_shards_everything(dp_runs):
    s = summary(dp_runs["fsdp", "fp32"])
    assert abs(s["model_state_bytes_per_rank"] - s["predicted_model_state_bytes_per_rank"]) <= \
        0.10 * s["predicted_model_state_bytes_per_rank"]


def test_zero3_holds_at_most_055x_ddp(dp_runs):
    """Mixed precision, as in the ZeRO paper: ddp 16Ψ per rank, zero3 16Ψ/N = 8Ψ on 2 ranks."""
    ddp = summary(dp_runs["ddp", "bf16"])["model_state_bytes_per_rank"]
    zero3 = summary(dp_runs["zero3", "bf16"])["model_state_bytes_per_rank"]
    assert zero3 <= 0.55 * ddp, f"zero3 {zero3} vs ddp {ddp}: ratio {zero3 / ddp:.3f}"


def test_sharding_order(dp_runs):
    """Each ZeRO stage holds less than the one before it (mixed precision)."""
    held = [summary(dp_runs[r, "bf16"])["model_state_bytes_per_rank"] for r in MEMORY_RECIPES]
    assert held == sorted(held, reverse=True) and len(set(held)) == len(held), held


# Bytes per parameter each rank holds on N = 2 ranks, by hand from the ZeRO paper's formula: p + g + K
# unsharded, K/N (zero1), (g + K)/N (zero2), (p + g + K)/N (zero3, fsdp). fp32: p = g = 4, K = 8 (Adam's
# two moments), K = 12 for DeepSpeed, which keeps its fp32 master copy too; bf16 under DeepSpeed: p = g = 2,
# K = 12; ddp's bf16 is autocast, its parameters, gradients and moments stay fp32.
BY_HAND = {("ddp", "fp32"): 4 + 4 + 8, ("zero1", "fp32"): 4 + 4 + 12 / 2, ("zero2", "fp32"): 4 + (4 + 12) / 2,
           ("zero3", "fp32"): (4 + 4 + 12) / 2, ("fsdp", "fp32"): (4 + 4 + 8) / 2,
           ("ddp", "bf16"): 4 + 4 + 8, ("zero1", "bf16"): 2 + 2 + 12 / 2, ("zero2", "bf16"): 2 + (2 + 12) / 2,
           ("zero3", "bf16"): (2 + 2 + 12) / 2}


@pytest.mark.parametrize("recipe,precision", sorted(BY_HAND))
def test_predicted_is_the_formula_by_hand(recipe, precision, dp_runs):
    """The figure the 10% test compares with is the paper's, not whatever parallel.memory computes."""
    s = summary(dp_runs[recipe, precision])
    assert s["dp"] == 2
    assert s["predicted_model_state_bytes_per_rank"] == round(BY_HAND[recipe, precision] * s["n_params"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ddp_ranks_hold_exactly_params_grads_and_two_moments(precision, dp_runs):
    """Unsharded, nothing to round: each rank holds one fp32 value per parameter for the parameters, their
    gradients, and each of Adam's two moments (autocast bf16 too). Ψ counted here, from the model itself."""
    from gpu_workbench.parallel import RunConfig
    from gpu_workbench.parallel.models.transformer import GPT

    n = sum(p.numel() for p in GPT(RunConfig.from_toml(TINY, BASE).model).parameters())   # tied weight once
    s = summary(dp_runs["ddp", precision])
    assert s["n_params"] == n
    for h in s["model_state_bytes_by_rank"]:
        assert h == {"params": 4 * n, "grads": 4 * n, "optimizer": 2 * 4 * n, "total": 16 * n}, h


def test_peak_memory_covers_what_each_rank_holds(dp_runs):
    """Peak memory per rank (CPU: the rank's peak resident set, in bytes) is at least the model state that
    rank held at once during the run, and the per-rank figure is the largest rank's."""
    for recipe in DP_RECIPES:
        s = summary(dp_runs[recipe, "fp32"])
        peaks, held = s["peak_memory_bytes_by_rank"], s["model_state_bytes_by_rank"]
        assert len(peaks) == len(held) == s["world_size"] == 2, (peaks, held)
        assert s["peak_memory_bytes_per_rank"] == max(peaks)
        for rank, (peak, h) in enumerate(zip(peaks, held, strict=True)):
            assert h["total"] == h["params"] + h["grads"] + h["optimizer"] > 0, (recipe, rank, h)
            assert peak >= h["total"], f"{recipe} rank {rank}: peak {peak} B below the {h['total']} B it holds"
