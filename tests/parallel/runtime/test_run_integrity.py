"""Run directories that nothing corrupts, through the real CLI: a second writer is refused, a resume
that does not fit is refused before anything is written, divergence never ends "successfully", and a
damaged checkpoint is skipped for the previous good one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpu_workbench.parallel.runtime.lock import RunLock
from gpu_workbench.parallel.runtime.summary import RunSummary
from tests.helpers.cli import ROOT, env, one_line, wb
from tests.helpers.runs import TINY, losses

FAST = ["--config", TINY, "progress=false", "model.d_model=32", "model.n_layers=1"]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "gpu_workbench", "train", *FAST, "--run-dir", str(run_dir),
                              "steps=100000", "checkpoint.every=0"], cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.2)
        second = wb("train", *FAST, "--run-dir", str(run_dir), "steps=3", "checkpoint.every=0")
        one_line(second, "is in use", f"PID {first.pid}")
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(len(steps))), "the refused run appended to the holder's metrics"
    finally:
        first.kill()
        first.wait()
    # killed with SIGKILL: its lock stays behind, naming a dead PID, and the next run takes it over
    assert json.loads((run_dir / ".lock").read_text())["pid"] == first.pid
    done = wb("train", *FAST, "--run-dir", str(run_dir), "steps=2", "checkpoint.every=0", "checkpoint.resume=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"taking over the stale lock of PID {first.pid}" in done.stderr
    assert not (run_dir / ".lock").exists()   # released at exit


def test_a_lock_file_that_races_is_not_shared(tmp_path):
    """O_EXCL: of two lockers of one free directory, the second is refused."""
    a = RunLock(tmp_path).acquire()
    os.environ.pop("WB_RUN_LOCK_TOKEN", None)
    with pytest.raises(ValueError, match="is in use"):
        RunLock(tmp_path).acquire()
    a.release()
    assert not (tmp_path / ".lock").exists()


def test_resume_mismatches_are_refused_before_anything_is_written(tmp_path, cli):
    run_dir = tmp_path / "run"
    done = cli("train", *FAST, "--run-dir", str(run_dir), "steps=4", "checkpoint.every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    before = _snapshot(run_dir)
    for extra, words in ((["model.d_model=16"], ["model.d_model is 16 in this run, 32 in the checkpoint"]),
                         (["steps=2"], ["holds 4 steps, more than steps=2"]),
                         (["seed=1"], ["seed is 1 in this run, 0 in the checkpoint"])):   # a recipe reshards
        refused = cli("train", *FAST, "--run-dir", str(run_dir), "steps=6", *extra)
        one_line(refused, "cannot resume", *words)
        assert _snapshot(run_dir) == before, f"{extra} changed the run directory"
    resumed = cli("train", *FAST, "--run-dir", str(run_dir), "steps=6", "checkpoint.every=2")
    assert resumed.returncode == 0 and "resumed from step 4" in resumed.stderr, resumed.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert [s["from_step"] for s in config["segments"]] == [0, 4]
    assert config["segments"][1]["changed"] == {"steps": [4, 6]}
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == list(range(6))


def test_divergence_never_exits_zero(tmp_path, cli):
    one_line(cli("train", *FAST, "--run-dir", str(tmp_path / "inf"), "optim.lr=inf"), "optim.lr", "finite")
    one_line(cli("train", *FAST, "--run-dir", str(tmp_path / "nan"), "optim.lr=nan"), "optim.lr", "finite")
    exploded = cli("train", *FAST, "--run-dir", str(tmp_path / "big"), "optim.lr=1e6", "steps=20", "checkpoint.every=0")
    one_line(exploded, "in a row skipped", "nan_skip_limit = 5", "diverged", code=1)
    stopped = cli("train", *FAST, "--run-dir", str(tmp_path / "stop"), "steps=6", "nan_policy=stop",
                 "fault.nan_at_step=3", "checkpoint.every=0")
    one_line(stopped, "step 3: non-finite", "nan_policy = 'stop'", code=1)


def test_rollback_reloads_the_last_good_checkpoint_with_a_lower_lr(tmp_path, cli):
    common = [*FAST, "steps=8", "checkpoint.every=2", "optim.warmup_steps=4"]
    clean = cli("train", *common, "--run-dir", str(tmp_path / "clean"))
    rolled = cli("train", *common, "--run-dir", str(tmp_path / "rolled"), "nan_policy=rollback",
                "fault.nan_at_step=5")
    assert clean.returncode == rolled.returncode == 0, rolled.stderr[-3000:]
    assert "rolled back to step 4" in rolled.stderr and "rollback 1 of 3" in rolled.stderr
    metrics = [json.loads(x) for x in (tmp_path / "rolled" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(8)) and all(m["applied"] for m in metrics)
    assert losses(tmp_path / "rolled")[:4] == losses(tmp_path / "clean")[:4]   # before the NaN: the same run
    for m, r in zip(metrics[4:], reference[4:], strict=True):   # from the rollback on: half the learning rate
        assert m["lr"] == pytest.approx(r["lr"] / 2, rel=1e-12)
    summary = RunSummary.load(tmp_path / "rolled" / "summary.json")
    assert summary.rollbacks == 1 and summary.skipped_steps == 1


@pytest.mark.parametrize("damage", ["empty-meta", "no-file-list"])
def test_a_damaged_manifest_falls_back_to_the_previous_checkpoint(tmp_path, damage, cli):
    run_dir = tmp_path / "run"
    done = cli("train", *FAST, "--run-dir", str(run_dir), "steps=4", "checkpoint.every=2", "checkpoint.keep=2")
    assert done.returncode == 0, done.stderr[-3000:]
    newest = run_dir / "checkpoints" / "step_000004"
    if damage == "empty-meta":
        (newest / "meta.json").write_text("{}")
    else:   # a manifest without a file list (never written for the universal format), beside a truncated file
        meta = json.loads((newest / "meta.json").read_text())
        del meta["files"]
        (newest / "meta.json").write_text(json.dumps(meta))
        state = newest / "trainer_rank0.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    resumed = cli("train", *FAST, "--run-dir", str(run_dir), "steps=4", "checkpoint.every=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint {newest} is damaged" in resumed.stderr and "resumed from step 2" in resumed.stderr
