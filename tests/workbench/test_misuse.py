"""An independent misuse suite (issue 30): the mistakes a new user makes, made the way the user makes them,
with the real `wb` in subprocesses run from a scratch working directory of their own. Each case checks what
the user sees (one line, the exit code) and that nothing of theirs or of the previous run was lost or mixed
up. One finished run is shared; a case that changes a run works on its own copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import ROOT, env, one_line

TINY = str(ROOT / "configs" / "tiny.toml")
TRAIN = ["train", "--config", TINY, "progress=false", "model.d_model=32", "model.n_layers=1"]
FINISHED = [*TRAIN, "steps=4", "checkpoint.every=2", "checkpoint.keep=2"]
DDP2 = ["--recipe", "ddp", "--nproc", "2"]   # the shared run is single's: ddp on 2 ranks resumes it resharded


def user(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`wb ARGS` as a user types it, in their working directory `cwd`."""
    return subprocess.run([sys.executable, "-m", "gpu_workbench", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=600)


def files(folder: Path) -> dict:
    """{relative path: (bytes, mtime)} of every file under `folder`: what must not change."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_in(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The user's working directory, holding one finished 4-step run (checkpoints after steps 2 and 4)."""
    home = tmp_path_factory.mktemp("user")
    done = user(home, *FINISHED, "--run-dir", "run")
    assert done.returncode == 0, done.stderr[-3000:]
    return home


@pytest.fixture
def copy(home, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(home / "run", run, copy_function=shutil.copy2)
    return run


def test_a_fresh_start_never_mixes_with_the_old_run(copy):
    old = files(copy)
    fresh = user(copy.parent, *TRAIN, "--run-dir", "run", "steps=3", "checkpoint.every=3", "checkpoint.resume=false")
    one_line(fresh, "the previous run in run moved to", code=0)
    (aside,) = (copy / "previous").iterdir()
    assert files(aside) == old   # the old run whole, its step_2 and step_4 with it
    assert [p.name for p in (copy / "checkpoints").iterdir()] == ["step_000003"] and steps_in(copy) == [0, 1, 2]
    again = user(copy.parent, *TRAIN, "--run-dir", "run", "steps=3", "checkpoint.every=3", "checkpoint.resume=false")
    assert again.returncode == 0 and files(aside) == old, again.stderr[-3000:]


def test_a_folder_of_the_users_own_is_never_written(home, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"lr": 0.1}\n')
    (mine / "metrics.jsonl").write_text('{"epoch": 0}\n')
    before = files(mine)
    one_line(user(tmp_path, *TRAIN, "--run-dir", "mine", "steps=1"), "is not empty and is not a wb run directory")
    one_line(user(tmp_path, *TRAIN, *DDP2, "--run-dir", "mine", "steps=1"), "is not a wb run directory")
    assert files(mine) == before


def test_a_torn_metrics_line_heals_and_a_damaged_run_refuses(copy):
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "tokens": 2560, "lo')   # a kill mid-write (SIGKILL, a full disk): no newline
    resumed = user(copy.parent, *FINISHED, "--run-dir", "run", "steps=5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "metrics.jsonl:5: dropping a torn last line" in resumed.stderr, resumed.stderr[-3000:]
    assert steps_in(copy) == [0, 1, 2, 3, 4]   # the torn line gone, step 4 once, every line JSON again
    for meta in copy.glob("checkpoints/step_*/meta.json"):
        meta.write_text("{")   # every checkpoint damaged
    before = files(copy)
    one_line(user(copy.parent, *FINISHED, "--run-dir", "run", "steps=6"), "every checkpoint in", "is damaged")
    assert files(copy) == before


def test_refusals_are_one_line_at_nproc_2_and_for_slurm(home, tmp_path):
    before = files(home / "run")
    for extra in (["seed=1"], ["model.arch=llama"]):
        one_line(user(home, *FINISHED, *DDP2, "--run-dir", "run", "steps=6", *extra), "cannot resume")
    line = one_line(user(home, *TRAIN, "--run-dir", str(tmp_path / "new"), "checkpoint.load_from=run",
                         "checkpoint.load_model_only=true", "model.arch=llama"), "model.arch is 'llama'")
    assert "needs only the model to match" not in line   # the hint that could not help
    fake = tmp_path / "bin"   # an sbatch that records: nothing may be queued
    fake.mkdir()
    (fake / "sbatch").write_text(f"#!/bin/bash\necho queued >> {tmp_path / 'queued'}\n")
    (fake / "sbatch").chmod(0o755)
    slurm = ["slurm", "render", "--submit", "--gpus-per-node", "0", "--out", str(tmp_path / "job.sbatch")]
    for render, job, words in ([["--nproc-per-node", "2"], ["stepz=5"], "unknown config key 'stepz'"],
                               [["--nproc-per-node", "2"], ["--run-dir", "run", "seed=1"], "cannot resume"],
                               [["--nproc-per-node", "0"], [], "--nproc-per-node must be >= 1"]):
        done = subprocess.run([sys.executable, "-m", "gpu_workbench", *slurm, *render, "--", "wb", *TRAIN,
                               "--recipe", "ddp", *job],
                              cwd=home, env=env(PATH=f"{fake}{os.pathsep}{env()['PATH']}"), capture_output=True,
                              text=True, timeout=600)
        one_line(done, words)
    assert not (tmp_path / "queued").exists() and not (tmp_path / "job.sbatch").exists()
    assert files(home / "run") == before


def test_plain_mistakes_are_one_line_and_leave_nothing(home, tmp_path):
    one_line(user(home, "sample", "run", "--prompt", "1 2", "--temperature", "nan"), "--temperature")
    (tmp_path / "folder").mkdir()
    one_line(user(tmp_path, "data", "prepare", str(ROOT / "README.md"), "--out", "folder"), "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]   # no runs.tmp, nothing else
    (tmp_path / "log").write_text("mine\n")
    one_line(user(tmp_path, *TRAIN, *DDP2, "--log-dir", "log", "--run-dir", "r", "steps=1"), "--log-dir")
    assert not (tmp_path / "r").exists() and (tmp_path / "log").read_text() == "mine\n"
    (tmp_path / "model.safetensors").write_text("mine\n")
    one_line(user(home, "checkpoint", "export", "run", "--out", str(tmp_path / "model.safetensors")), "--force")
    assert (tmp_path / "model.safetensors").read_text() == "mine\n"


def test_a_finished_run_rerun_changes_nothing(home):
    before = files(home / "run")
    one_line(user(home, *FINISHED, "--run-dir", "run"), "nothing to do", code=0)
    assert files(home / "run") == before


def test_quant_eval_runs_on_the_shipped_llama_tiny_with_its_defaults(tmp_path):
    llama = str(ROOT / "configs" / "llama-tiny.toml")
    trained = user(tmp_path, "train", "--config", llama, "--run-dir", "llama", "steps=1", "checkpoint.every=1",
                   "eval.every=0", "progress=false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    done = user(tmp_path, "quant", "eval", "llama", "--batches", "1")
    assert done.returncode == 0 and "w4a16" in done.stdout, done.stderr[-3000:]
