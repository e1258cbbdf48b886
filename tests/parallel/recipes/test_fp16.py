"""precision = "fp16": fp16 autocast with dynamic loss scaling over fp32 weights (parallel/recipes/loss_scale.py).
An injected overflow (fault.overflow_at_step) skips exactly that step and halves the scale, under single, ddp x2
and fsdp x2 (ShardedGradScaler), and is no divergence under nan_policy = "stop"; a 20-step fp16 run tracks the
fp32 run; where the scaler is not wired it is refused in one line."""

from __future__ import annotations

import pytest

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.recipes import resolve
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.rundir import read_metrics
from tests.helpers.cli import ROOT
from tests.helpers.runs import assert_matches_single, losses, rel, summary, torchrun, train_single

LLAMA = str(ROOT / "configs" / "llama-tiny.toml")
COMMON = ["progress=false", "checkpoint.every=0", "checkpoint.save_final=true", "eval.every=0"]
OVERFLOW = ["steps=5", "precision=fp16", "fault.overflow_at_step=2", "nan_policy=stop"]
# fp16 has an 11-bit significand: each rounding is within 2^-11 = 4.9e-4 relative. The loss itself is computed in
# fp32 (cross-entropy under autocast) from fp16 matmul outputs, whose rounding errors average out over the
# d_model-long sums, and the weights stay fp32; over 20 AdamW steps the two runs drift apart slowly. Measured on
# llama-tiny: the worst per-step difference is ~2e-5 relative. 1e-3 (about 2 fp16 ulps of the loss) is an
# order of magnitude above that and two below what a broken scaler gives (an unscaled update is 65536x off).
FP16_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    train_single(root / "single", [*COMMON, *OVERFLOW], LLAMA)
    torchrun(2, [(LLAMA, [*COMMON, *OVERFLOW, f"recipe={r}", f"run_dir={root / r}"]) for r in ("ddp", "fsdp")])
    for precision in ("fp32", "fp16"):
        train_single(root / f"track-{precision}", [*COMMON, "steps=20", f"precision={precision}"], LLAMA)
    return root


@pytest.mark.parametrize("recipe", ["single", "ddp", "fsdp"])
def test_overflow_skips_that_step_and_halves_the_scale(runs, recipe):
    rows = read_metrics(runs / recipe)
    assert [m["applied"] for m in rows] == [True, True, False, True, True]
    assert [m["overflow"] for m in rows] == [False, False, True, False, False]
    scales = [m["loss_scale"] for m in rows]
    assert scales[2] == scales[1] / 2 and scales[3:] == [scales[2]] * 2, scales
    assert rows[3]["lr"] == rows[2]["lr"]   # the skipped step did not move the schedule either
    got = summary(runs / recipe)
    assert (got["overflow_steps"], got["skipped_steps"], got["loss_scale"]) == (1, 1, scales[-1])
    if recipe != "single":   # every rank skipped together: the same losses as one process
        assert_matches_single(runs / recipe, runs / "single", 5)


def test_fp16_tracks_fp32(runs):
    fp32, fp16 = losses(runs / "track-fp32"), losses(runs / "track-fp16")
    assert len(fp16) == len(fp32) == 20
    worst = max(rel(a, b) for a, b in zip(fp16, fp32, strict=True))
    assert worst < FP16_TOLERANCE, (worst, fp16, fp32)
    assert fp16[-1] < fp16[0] - 0.1   # and it trains
    assert summary(runs / "track-fp16")["overflow_steps"] == 0


@pytest.mark.parametrize(("overrides", "words"), [
    (["recipe=zero2", "precision=fp16"], "precision=fp16 with recipe=zero2"),
    (["recipe=pipeline", "precision=fp16"], "precision=fp16 with recipe=pipeline"),
    (["recipe=ddp", "tp.degree=2", "precision=fp16"], "precision=fp16 with tp.degree=2"),
    (["recipe=ddp", "fault.overflow_at_step=3"], "fault.overflow_at_step=3 needs precision=fp16"),
])
def test_refused_in_one_line(overrides, words):
    with pytest.raises(UserError, match=words) as err:
        resolve(RunConfig.from_toml(LLAMA, overrides), world_size=2)
    assert "\n" not in str(err.value)
