"""A run's checkpoints are verified once, in the launching process (parallel/loop/preflight.py), which hands its
start decision to the workers (parallel/checkpoint/handed.py): rank 0 takes it while the run directory's
checkpoints are as the launcher listed them, re-checked at its real world size, and plans again otherwise.
An elastic job's launcher checks the one checkpoint against every size the job may run at."""

from __future__ import annotations

import shutil

import pytest

from gpu_workbench.parallel import RunConfig, recipes
from gpu_workbench.parallel.checkpoint import handed, listing, start
from gpu_workbench.parallel.loop.preflight import preflight
from gpu_workbench.parallel.runtime.errors import UserError
from tests.helpers.cli import wb
from tests.helpers.runs import TINY

FAST = ["--config", TINY, "--recipe", "ddp", "progress=false", "model.d_model=32", "model.n_layers=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step ddp run with a checkpoint after each step (the real CLI)."""
    run_dir = tmp_path_factory.mktemp("plan") / "run"
    done = wb("train", *FAST, "--run-dir", str(run_dir), "steps=2", "checkpoint.every=1", "checkpoint.keep=2")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture
def verified(monkeypatch) -> list:
    """Every checkpoint folder the real verification (sha256 of each file) reads, in order."""
    calls, real = [], listing.verify

    def counting(path, trusted=()):
        calls.append(path.name)
        return real(path, trusted)

    monkeypatch.setattr(listing, "verify", counting)
    return calls


def _cfg(run_dir, *extra) -> RunConfig:
    return RunConfig.from_toml(TINY, ["recipe=ddp", "model.d_model=32", "model.n_layers=1", "steps=3",
                                      f"run_dir={run_dir}", *extra])


def _decide(cfg, world_size):
    recipe = recipes.get(cfg.recipe)
    return start.decide(cfg.run_dir, cfg, world_size, True, recipe.checkpoint_format, recipe.checkpoint_globals())


def test_the_workers_take_the_launchers_plan_without_verifying_again(trained, verified, monkeypatch):
    cfg = _cfg(trained)
    plan = preflight(cfg, 2)
    assert plan.how == "resume" and plan.path.endswith("step_000002") and verified == ["step_000002"]
    monkeypatch.setenv(handed.ENV, handed.encode(plan, trained))
    assert _decide(cfg, 2) == plan and verified == ["step_000002"]   # rank 0 of the workers: nothing re-read
    assert _decide(cfg, 1).resharded != plan.resharded   # re-checked at the world size it really runs at
    (trained / "checkpoints" / "step_000001" / "meta.json").touch()   # the checkpoints changed since: plan again
    assert _decide(cfg, 2) == plan and verified == ["step_000002", "step_000002"]
    monkeypatch.setenv(handed.ENV, handed.encode(plan, trained.parent / "elsewhere"))   # another run's plan
    assert _decide(cfg, 2) == plan and len(verified) == 3


def test_an_elastic_launch_checks_every_size_verifying_once(trained, verified):
    plan = preflight(_cfg(trained), range(1, 3))   # --launcher ray --nproc 1:2
    assert plan.how == "resume" and verified == ["step_000002"]
    with pytest.raises(UserError, match="global_batch .* must be divisible"):   # a size whose layout cannot run
        preflight(_cfg(trained, "global_batch=12", "micro_batch=4"), range(1, 4))


def test_a_damaged_checkpoint_is_reported_once_at_nproc_2(trained, tmp_path):
    """The launcher verifies; the workers' rank 0 takes its plan: one line about the damage, not two."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    newest = run_dir / "checkpoints" / "step_000002"
    (newest / "meta.json").write_text("{}")
    done = wb("train", *FAST, "--nproc", "2", "--run-dir", str(run_dir), "steps=3", "checkpoint.every=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(f"checkpoint {newest} is damaged") == 1, done.stderr[-3000:]
    assert done.stderr.count("wb: resuming step_000001 written by ddp on 1 rank as ddp on 2 ranks") == 1, \
        done.stderr[-3000:]
