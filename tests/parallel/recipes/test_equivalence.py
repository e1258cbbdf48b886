"""A distributed recipe is correct when it matches `single`: the loss at each of 10 steps within 1e-5
relative and the final parameters within 1e-5 (fp32, CPU, deterministic), on 2 real processes."""

from __future__ import annotations

import pytest

from tests.helpers.runs import BASE, assert_matches_single, final_params, losses, max_rel_diff, rel, train_single
from tests.parallel.conftest import DP_RECIPES

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("recipe", [*DP_RECIPES, "zero2-offload", "zero3-dsjson"])
def test_recipe_matches_single(recipe, reference, dp_runs):
    assert_matches_single(dp_runs[recipe, "fp32"], reference, steps=10, norms=False)
    ref = losses(reference)
    assert ref[-1] < ref[0]    # it trains


def test_micro_batching_equals_one_big_batch(reference, tmp_path):
    """micro 4 x accum 4 (the reference) gives the same steps as micro 16 x accum 1."""

    run_dir = tmp_path / "micro16"
    train_single(run_dir, [*BASE, "micro_batch=16"])
    worst = max(rel(a, b) for a, b in zip(losses(run_dir), losses(reference), strict=True))
    assert worst < 1e-5
    assert max_rel_diff(final_params(run_dir), final_params(reference)) < 1e-5
