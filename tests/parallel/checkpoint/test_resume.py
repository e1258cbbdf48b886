"""Kill and resume: a run whose rank dies abruptly after a checkpoint resumes from the newest complete
checkpoint and ends with the same parameters (and per-step losses) as an uninterrupted run."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers.runs import (
    BASE,
    NO_DEEPSPEED,
    TINY,
    final_params,
    losses,
    max_rel_diff,
    runnable,
    summary,
    torchrun,
    wb,
)

pytestmark = pytest.mark.slow

RESUMED = ["zero2", "fsdp"]   # DeepSpeed's own checkpoints, and torch.distributed.checkpoint shards


def test_kill_and_resume_equals_uninterrupted(tmp_path, dp_runs):
    """The uninterrupted runs are the equivalence tests' (same config, checkpoints do not change the numbers).
    Without DeepSpeed, fsdp alone is checked, then the test skips for zero2."""
    resumed = [r for r in RESUMED if runnable(r)]
    for recipe in resumed:
        # rank 1 dies at step 5: the checkpoint after 3 steps is complete, the one after 6 never starts
        run_dir = tmp_path / recipe
        first = wb("train", "--recipe", recipe, "--nproc", "2", "--config", TINY, "--run-dir", str(run_dir), *BASE,
                   "checkpoint.every=3", "checkpoint.keep=1", "fault.kill_rank=1", "fault.at_step=5")
        assert first.returncode != 0
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000003"]
        assert not (run_dir / "final_model.pt").exists()
    # the same runs again, fault off: they resume from step 3 (both in one launch)
    torchrun(2, [(TINY, [*BASE, "checkpoint.every=3", "checkpoint.keep=1", f"recipe={recipe}",
                         f"run_dir={tmp_path / recipe}"]) for recipe in resumed])
    for recipe in resumed:
        run_dir, clean = tmp_path / recipe, dp_runs[recipe, "fp32"]
        assert summary(run_dir)["resumed_from_step"] == 3
        assert max_rel_diff(final_params(run_dir), final_params(clean)) < 1e-6, recipe
        assert losses(run_dir) == pytest.approx(losses(clean), rel=1e-6)
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000010"]   # keep=1
    if resumed != RESUMED:
        pytest.skip(f"{', '.join(sorted(set(RESUMED) - set(resumed)))} not resumed ({', '.join(resumed)} was): "
                    f"{NO_DEEPSPEED}")


def test_resume_single_in_process(tmp_path):
    """`single`: run 8 steps, drop every checkpoint after step 4 (as if the process had died at step
    5), run again: it resumes at 4 and ends bit-identical to the first, uninterrupted run."""
    from gpu_workbench.parallel import RunConfig, train

    run_dir = tmp_path / "run"
    cfg = RunConfig.from_toml(TINY, [*BASE, "recipe=single", "steps=8", "checkpoint.every=2", "checkpoint.keep=4",
                                     f"run_dir={run_dir}"])
    train(cfg)
    clean_params, clean_losses = final_params(run_dir), losses(run_dir)
    for later in ("step_000006", "step_000008"):
        shutil.rmtree(run_dir / "checkpoints" / later)
    (run_dir / "final_model.pt").unlink()
    (run_dir / "checkpoints" / "step_000006.tmp").mkdir()   # a half-written checkpoint is ignored
    summary = train(cfg)
    assert summary.resumed_from_step == 4
    assert max_rel_diff(final_params(run_dir), clean_params) == 0.0
    assert losses(run_dir) == clean_losses


def test_resume_refuses_another_model(tmp_path):
    """Another recipe or world size reshards (test_universal_checkpoint.py); another model shape cannot."""
    from gpu_workbench.parallel import RunConfig, train

    cfg = [*BASE, "steps=2", "checkpoint.every=1", "checkpoint.save_final=false", f"run_dir={tmp_path}",
           "recipe=single"]
    train(RunConfig.from_toml(TINY, cfg))
    with pytest.raises(ValueError, match="model.n_heads is 2 in this run, 4 in the checkpoint"):
        train(RunConfig.from_toml(TINY, [*cfg, "model.n_heads=2"]))
