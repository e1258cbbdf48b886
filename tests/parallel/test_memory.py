"""Model-state bytes each rank actually holds vs the ZeRO paper's formula, on 2 ranks, >= 1M params."""

from __future__ import annotations

import pytest

from tests.parallel.conftest import DP_RECIPES, MEMORY_RECIPES
from tests.parallel.runs import summary

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


def test_peak_memory_reported(dp_runs):
    for recipe in DP_RECIPES:
        s = summary(dp_runs[recipe, "fp32"])
        assert len(s["peak_memory_bytes_by_rank"]) == 2 and s["peak_memory_bytes_per_rank"] > 0
