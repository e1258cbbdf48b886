"""The ps, local_sgd and straggler config sections: typed, validated up front, one error naming the field;
and the recipes that launch their own workers (async-ps, hogwild) through `wb train` in-process."""

from __future__ import annotations

import pytest

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.recipes import RECIPES, resolve
from tests.helpers.runs import TINY, wb


@pytest.mark.parametrize("overrides, field", [
    (["ps.staleness=-1"], "ps.staleness"),
    (["ps.shards=0"], "ps.shards"),
    (["ps.on_worker_death=retry"], "ps.on_worker_death"),
    (["local_sgd.sync_every=0"], "local_sgd.sync_every"),
    (["local_sgd.outer_momentum=1.0"], "local_sgd.outer_momentum"),
    (["straggler.factor=0.5"], "straggler.factor"),
    (["straggler.rank=-2"], "straggler.rank"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RunConfig.from_toml(TINY, overrides)


def test_straggler_rank_must_exist():
    cfg = RunConfig.from_toml(TINY, ["recipe=ddp", "straggler.rank=2", "straggler.factor=3"])
    resolve(cfg, 4)
    with pytest.raises(ValueError, match=r"straggler\.rank \(2\) must be < world size \(2\)"):
        resolve(cfg, 2)


def test_sections_parse_and_recipes_are_registered():
    cfg = RunConfig.from_toml(TINY, ["ps.staleness=4", "ps.shards=2", "ps.ray_address=auto", "local_sgd.sync_every=16",
                                     "straggler.rank=1", "straggler.factor=2.5", "ps.on_worker_death=drop"])
    assert (cfg.ps.staleness, cfg.ps.shards, cfg.ps.ray_address, cfg.ps.on_worker_death) == (4, 2, "auto", "drop")
    assert cfg.local_sgd.sync_every == 16 and cfg.straggler.factor == 2.5
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RECIPES["async-ps"].execution == "ray-actors" and RECIPES["hogwild"].execution == "processes"
    assert RECIPES["local-sgd"].execution == RECIPES["diloco"].execution == "spmd"


def test_wb_train_rejects_a_bad_worker_count_before_starting_anything():
    """async-ps runs in the `wb` process (no torchrun); its --nproc is still checked against the batch."""
    done = wb("train", f"--config={TINY}", "--recipe", "async-ps", "--nproc", "3", timeout=120)
    assert done.returncode == 2
    assert "global_batch (16) must be divisible by micro_batch (4) x data-parallel degree (3)" in done.stderr
    assert "Traceback" not in done.stderr


def test_hogwild_workers_from_a_fork_server(tmp_path, monkeypatch):
    """Where a forked child cannot run backward (autograd's threads started here: a CUDA build of torch after a
    compiled backward), hogwild's workers come from a fork server; the model is shared with them all the same."""
    import torch

    from gpu_workbench.parallel import train
    from gpu_workbench.parallel.recipes import hogwild
    from gpu_workbench.parallel.runtime.rundir import read_metrics

    monkeypatch.setattr(hogwild, "start_method", lambda: "forkserver")
    run = tmp_path / "run"
    train(RunConfig.from_toml(TINY, ["recipe=hogwild", "steps=3", "global_batch=8", "progress=false", "eval.every=0",
                                     "checkpoint.every=0", "checkpoint.save_final=true", f"run_dir={run}"]), 2)
    rows = read_metrics(run)
    assert sorted((m["worker"], m["clock"]) for m in rows) == [(w, c) for w in (0, 1) for c in range(3)]
    init = hogwild.build(RunConfig.from_toml(TINY, []).model).state_dict()   # seed 0: the workers' start
    final = torch.load(run / "final_model.pt", weights_only=True)
    assert any(not torch.equal(final[k], v) for k, v in init.items())   # the workers' updates reached the model
