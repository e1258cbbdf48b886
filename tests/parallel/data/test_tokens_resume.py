"""Exact resume on prepared token data: ddp x2 with 2 prefetch workers on a 2-source mix, killed mid-run and
resumed, has bitwise the per-step losses of the run never interrupted; the same checkpoint resumed at dp=1
(resharded) hands every global sample to training exactly once (sample ids recorded by WB_SAMPLE_LOG). The
checkpoint carries the loader position; another dataset is refused in one line, the weights alone are not."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers.runs import TINY, losses, summary, torchrun, wb

pytestmark = pytest.mark.slow
STEPS, G = 6, 8
BASE = [f"steps={STEPS}", "progress=false", "model.d_model=32", "model.n_layers=1", "model.vocab_size=256",
        "model.seq_len=32", f"global_batch={G}", "micro_batch=2", "optim.warmup_steps=1", "checkpoint.every=3",
        "checkpoint.keep=2", "checkpoint.save_final=false", "data.kind=tokens", "data.workers=2", "recipe=ddp"]


def _samples(folder) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("samples-*.jsonl")) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two datasets from the interpreter's own docstrings; one killed ddp x2 run (rank 1 dies at step 4, after
    the checkpoint of step 3); then, in one launch, the uninterrupted run and the killed one resumed."""
    from gpu_workbench.parallel.tokens.corpus import docstrings, package_root
    from gpu_workbench.parallel.tokens.prepare import prepare

    root = tmp_path_factory.mktemp("resume")
    for name in ("json", "email"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                    for d in docstrings(package_root("stdlib") / name)))
        prepare([str(root / f"{name}.jsonl")], "bytes", root / name, workers=1, progress=False)
    mix = [*BASE, f"data.mix=['{root / 'json'}:1', '{root / 'email'}:3']"]
    killed = wb("train", "--nproc", "2", "--config", TINY, "--run-dir", str(root / "killed"), *mix,
                "fault.kill_rank=1", "fault.at_step=4", env={"WB_SAMPLE_LOG": str(root / "log-killed")})
    assert killed.returncode != 0 and (root / "killed" / "checkpoints" / "step_000003").is_dir(), killed.stderr[-2000:]
    shutil.copytree(root / "killed", root / "killed-dp1")
    torchrun(2, [(TINY, [*mix, f"run_dir={root / 'clean'}"]), (TINY, [*mix, f"run_dir={root / 'killed'}"])])
    return root, mix


def test_killed_and_resumed_equals_uninterrupted_bitwise(runs):
    root, _ = runs
    meta = json.loads((root / "killed" / "checkpoints" / "step_000003" / "meta.json").read_text())
    assert meta["data"]["global_sample"] == 3 * G and sum(meta["data"]["consumed"]) == 3 * G
    assert summary(root / "killed")["resumed_from_step"] == 3
    assert len(losses(root / "clean")) == STEPS
    assert losses(root / "killed") == losses(root / "clean")   # bitwise


def test_resumed_at_dp1_sees_every_sample_once(runs, monkeypatch):
    from gpu_workbench.parallel import RunConfig, train

    root, mix = runs
    monkeypatch.setenv("WB_SAMPLE_LOG", str(root / "log-dp1"))
    train(RunConfig.from_toml(TINY, [*mix, f"run_dir={root / 'killed-dp1'}"]))
    before = [r for r in _samples(root / "log-killed") if r["step"] < 3]
    after = _samples(root / "log-dp1")
    assert {r["step"] for r in after} == set(range(3, STEPS))
    ids = sorted(r["g"] for r in before + after)
    assert ids == list(range(STEPS * G))                                 # none repeated, none skipped
    assert {r["source"] for r in before + after} == {0, 1}
    windows = [(r["source"], r["epoch"], r["start"]) for r in before + after]
    assert len(set(windows)) == len(windows)                             # no window twice within an epoch
    assert losses(root / "killed-dp1")[3:] == pytest.approx(losses(root / "clean")[3:], rel=1e-5)


def test_another_dataset_is_refused_unless_model_only(runs, tmp_path):
    from gpu_workbench.parallel import RunConfig, train
    from gpu_workbench.parallel.runtime.errors import UserError

    root, mix = runs
    other = [*BASE, f"data.path={root / 'email'}", "steps=3", f"run_dir={tmp_path}", "recipe=single"]
    with pytest.raises(UserError, match="cannot start from checkpoint.load_from=.*data.manifest"):
        train(RunConfig.from_toml(TINY, [*other, f"checkpoint.load_from={root / 'clean'}"]))
    done = train(RunConfig.from_toml(TINY, [*other, f"checkpoint.load_from={root / 'clean'}",
                                            "checkpoint.load_model_only=true"]))
    assert done.steps == 3
