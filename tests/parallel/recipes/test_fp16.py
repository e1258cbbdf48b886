"""precision = "fp16": fp16 autocast with dynamic loss scaling over fp32 weights (parallel/recipes/loss_scale.py).
An injected overflow (fault.overflow_at_step) skips exactly that step and halves the scale, under single, ddp x2
and fsdp x2 (ShardedGradScaler), and is no divergence under nan_policy = "stop"; a 20-step fp16 run tracks the
fp32 run; where the scaler is not wired it is refused in one line."""

from __future__ import annotations

import shutil

import pytest

from gpu_workbench.parallel import RunConfig, train
from gpu_workbench.parallel.recipes import resolve
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.rundir import read_metrics
from tests.helpers.cli import ROOT
from tests.helpers.runs import assert_matches_single, losses, rel, summary, torchrun, train_single

LLAMA = str(ROOT / "configs" / "llama-tiny.toml")
COMMON = ["progress=false", "checkpoint.every=0", "checkpoint.save_final=true", "eval.every=0"]
OVERFLOW = ["steps=5", "global_batch=8", "precision=fp16", "fault.overflow_at_step=2", "nan_policy=stop"]
# The tolerance: fp16 rounds each matmul output within 2^-11 = 4.9e-4 relative; the cross-entropy runs in fp32 and
# the loss is the mean over the step's 256 tokens (global_batch 4 x seq_len 64), whose independent rounding errors
# average down by sqrt(256): ~3e-5 of the loss per step, and the fp32 weights keep the 20 AdamW steps from
# compounding much more. Measured (llama-tiny, CPU): the worst step differs by 7e-6 relative (5.6e-6 at
# global_batch 16). 1e-4 is over 3x the estimate; a broken scaler is far outside it (an update not unscaled is
# 65536x too large, and a skipped step leaves that step's loss unchanged).
FP16_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    train_single(root / "single", [*COMMON, *OVERFLOW], LLAMA)
    for precision in ("fp32", "fp16"):
        train_single(root / f"track-{precision}", [*COMMON, "steps=20", "global_batch=4", f"precision={precision}"],
                     LLAMA)
    return root


@pytest.fixture(scope="module")
def two_ranks(runs):
    """ddp x2 and fsdp x2 (ShardedGradScaler) in one launch, beside the single run: ~40 s, so `slow`; the
    acceptance's overflow is proven by single, these prove the scaler of each data-parallel engine."""
    torchrun(2, [(LLAMA, [*COMMON, *OVERFLOW, f"recipe={r}", f"run_dir={runs / r}"]) for r in ("ddp", "fsdp")])
    return runs


def test_overflow_skips_that_step_and_halves_the_scale(runs):
    _check_overflow(runs, "single")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ddp", "fsdp"])
def test_overflow_under_ddp_and_fsdp(two_ranks, recipe):
    _check_overflow(two_ranks, recipe)
    assert_matches_single(two_ranks / recipe, two_ranks / "single", 5)   # every rank skipped together


def _check_overflow(runs, recipe: str) -> None:
    rows = read_metrics(runs / recipe)
    assert [m["applied"] for m in rows] == [True, True, False, True, True]
    assert [m["overflow"] for m in rows] == [False, False, True, False, False]
    scales = [m["loss_scale"] for m in rows]
    assert scales[2] == scales[1] / 2 and scales[3:] == [scales[2]] * 2, scales
    assert rows[3]["lr"] == rows[2]["lr"]   # the skipped step did not move the schedule either
    got = summary(runs / recipe)
    assert (got["overflow_steps"], got["skipped_steps"], got["loss_scale"]) == (1, 1, scales[-1])


def test_fp16_tracks_fp32(runs):
    fp32, fp16 = losses(runs / "track-fp32"), losses(runs / "track-fp16")
    assert len(fp16) == len(fp32) == 20
    worst = max(rel(a, b) for a, b in zip(fp16, fp32, strict=True))
    assert worst < FP16_TOLERANCE, (worst, fp16, fp32)
    assert fp16[-1] < fp16[0] - 0.5   # and it trains
    assert summary(runs / "track-fp16")["overflow_steps"] == 0


def test_a_resumed_run_keeps_the_loss_scale(runs, tmp_path):
    """The scaler is in the checkpoint: resumed after the overflow's halving, the run goes on at the halved scale,
    as the uninterrupted run (a fresh scaler would start again at 65536)."""
    run_dir = tmp_path / "run"
    cfg = RunConfig.from_toml(LLAMA, [*COMMON, *OVERFLOW, "checkpoint.every=3", "checkpoint.keep=2",
                                      f"run_dir={run_dir}"])
    train(cfg)
    for later in (p for p in (run_dir / "checkpoints").iterdir() if p.name != "step_000003"):
        shutil.rmtree(later)
    (run_dir / "final_model.pt").unlink()
    assert train(cfg).resumed_from_step == 3
    scales = [m["loss_scale"] for m in read_metrics(run_dir)]
    assert scales == [m["loss_scale"] for m in read_metrics(runs / "single")] and scales[3] < scales[0], scales
    assert losses(run_dir) == losses(runs / "single")


@pytest.mark.parametrize(("overrides", "words"), [
    (["recipe=zero2", "precision=fp16"], "precision=fp16 with recipe=zero2"),
    (["recipe=pipeline", "precision=fp16"], "precision=fp16 with recipe=pipeline"),
    (["recipe=ddp", "tp.degree=2", "precision=fp16"], "precision=fp16 with tp.degree=2"),
    (["recipe=ddp", "model.moe.experts=4", "ep.degree=2", "precision=fp16"], "precision=fp16 with ep.degree=2"),
    (["recipe=ddp", "fault.overflow_at_step=3"], "fault.overflow_at_step=3 needs precision=fp16"),
])
def test_refused_in_one_line(overrides, words):
    with pytest.raises(UserError, match=words) as err:
        resolve(RunConfig.from_toml(LLAMA, overrides), world_size=2)
    assert "\n" not in str(err.value)
