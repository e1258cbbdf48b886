"""A run directory that never lies, through the real CLI (in this process): a fresh start moves the old run
aside whole, a foreign folder is never written into, a resume segment is recorded only once the checkpoint
has loaded, a torn last metrics line is dropped and any other damage refused, a run whose every checkpoint
is damaged refuses to start silently from step 0, and a finished run rerun as it was changes nothing.
Every check compares bytes: nothing of the user's or of the previous run is lost or mixed up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.cli import one_line
from tests.helpers.runs import TINY

FAST = ["train", "--config", TINY, "progress=false", "model.d_model=32", "model.n_layers=1"]
FINISHED = [*FAST, "steps=4", "checkpoint.every=2"]


def snapshot(folder: Path, mtimes: bool = False) -> dict:
    """{relative path: bytes (and mtime)} of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns if mtimes else None)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_in(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 4-step run (checkpoints after 2 and 4) that each test copies."""
    import torch.distributed as dist

    from gpu_workbench.cli.app import main

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    try:
        main([*FINISHED, "--run-dir", str(run_dir)])
    except SystemExit as done:
        assert not done.code, done.code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert (run_dir / "summary.json").is_file()
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, copy_function=shutil.copy2)   # mtimes too
    return copy


def test_a_fresh_start_moves_the_old_run_aside(tmp_path, cli):
    run_dir = tmp_path / "run"
    first = cli(*FAST, "--run-dir", str(run_dir), "steps=6", "checkpoint.every=2", "checkpoint.keep=2")
    assert first.returncode == 0, first.stderr[-3000:]
    old = snapshot(run_dir)
    assert {"run.json", "config.json", "metrics.jsonl", "summary.json", "checkpoints/step_000006/meta.json"} <= set(old)
    fresh = cli(*FAST, "--run-dir", str(run_dir), "steps=3", "checkpoint.every=3", "seed=1", "checkpoint.resume=false")
    err = one_line(fresh, "checkpoint.resume=false: the previous run in", "moved to", code=0)
    (slot,) = (run_dir / "previous").iterdir()
    assert err.endswith(str(slot)) and snapshot(slot) == old   # everything of the old run, byte for byte
    assert steps_in(run_dir) == [0, 1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000003"]
    assert [s["from_step"] for s in json.loads((run_dir / "config.json").read_text())["segments"]] == [0]
    resumed = cli(*FAST, "--run-dir", str(run_dir), "steps=4", "checkpoint.every=3", "seed=1")
    assert resumed.returncode == 0 and "resumed from step 3" in resumed.stderr, resumed.stderr[-3000:]
    assert steps_in(run_dir) == [0, 1, 2, 3] and snapshot(slot) == old
    again = cli(*FAST, "--run-dir", str(run_dir), "steps=1", "checkpoint.resume=false")
    assert again.returncode == 0, again.stderr[-3000:]
    slots = sorted((run_dir / "previous").iterdir())
    assert len(slots) == 2 and snapshot(slots[0]) == old   # an earlier previous/ entry stays where it is
    assert not (slots[1] / "previous").exists() and steps_in(slots[1]) == [0, 1, 2, 3]


def test_a_folder_that_is_no_run_directory_is_refused(tmp_path, cli):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"learning_rate": 0.1, "notes": "my own experiment"}\n')
    (mine / "metrics.jsonl").write_text('{"epoch": 0, "acc": 0.5}\n')
    before = snapshot(mine, mtimes=True)
    for extra in ([], ["checkpoint.resume=false"]):
        refused = cli(*FAST, "--run-dir", str(mine), "steps=1", *extra)
        one_line(refused, f"{mine} is not empty and is not a wb run directory")
        assert snapshot(mine, mtimes=True) == before and sorted(p.name for p in mine.iterdir()) == sorted(before)


def test_a_run_directory_from_before_the_marker_is_accepted_and_marked(run_copy, cli):
    (run_copy / "run.json").unlink()
    resumed = cli(*FINISHED, "--run-dir", str(run_copy), "steps=5")
    assert resumed.returncode == 0 and "resumed from step 4" in resumed.stderr, resumed.stderr[-3000:]
    assert json.loads((run_copy / "run.json").read_text())["schema"] == "gpu-workbench run"


def test_the_resume_segment_is_written_only_after_the_checkpoint_loaded(run_copy, cli, monkeypatch):
    from gpu_workbench.parallel import checkpoint

    before = snapshot(run_copy)

    def broken_load(*args, **kwargs):
        raise RuntimeError("injected: the load crashed")

    monkeypatch.setattr(checkpoint, "load", broken_load)
    with pytest.raises(RuntimeError, match="injected"):
        cli(*FINISHED, "--run-dir", str(run_copy), "steps=6")
    assert snapshot(run_copy) == before   # no segment, metrics not cut back, no new marker
    monkeypatch.undo()
    assert cli(*FINISHED, "--run-dir", str(run_copy), "steps=6").returncode == 0
    segments = json.loads((run_copy / "config.json").read_text())["segments"]
    assert [s["from_step"] for s in segments] == [0, 4] and segments[1]["checkpoint"]["how"] == "resume"


def test_a_torn_last_metrics_line_is_dropped(run_copy, cli):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "tokens": 2560, "lo')   # a write cut off by SIGKILL: no newline, not JSON
    resumed = cli(*FINISHED, "--run-dir", str(run_copy), "steps=5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{run_copy / 'metrics.jsonl'}:5: dropping a torn last line" in resumed.stderr
    assert steps_in(run_copy) == [0, 1, 2, 3, 4]   # every line valid JSON again


@pytest.mark.parametrize("damage", ["garbled", "not-a-record"])
def test_a_damaged_metrics_line_is_refused(run_copy, cli, damage):
    lines = (run_copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"step": 1, "lo\n' if damage == "garbled" else "[1, 2]\n"
    (run_copy / "metrics.jsonl").write_text("".join(lines))
    before = snapshot(run_copy, mtimes=True)
    refused = cli(*FINISHED, "--run-dir", str(run_copy), "steps=5")
    one_line(refused, f"{run_copy / 'metrics.jsonl'}:2: damaged line")
    assert snapshot(run_copy, mtimes=True) == before


def test_every_checkpoint_damaged_is_refused_not_restarted(run_copy, cli):
    for state in (run_copy / "checkpoints").rglob("*"):
        if state.is_file() and state.name != "meta.json":
            state.write_bytes(bytes(b ^ 0xFF for b in state.read_bytes()))
    before = snapshot(run_copy, mtimes=True)
    refused = cli(*FINISHED, "--run-dir", str(run_copy), "steps=5")
    one_line(refused, "every checkpoint in", "is damaged (2;", "checkpoint.resume=false")
    assert snapshot(run_copy, mtimes=True) == before


def test_a_finished_run_rerun_as_it_was_changes_nothing(run_copy, cli):
    before = snapshot(run_copy, mtimes=True)
    done = cli(*FINISHED, "--run-dir", str(run_copy))
    one_line(done, "already finished its 4 steps with these settings: nothing to do", code=0)
    assert snapshot(run_copy, mtimes=True) == before
    assert sorted(p.name for p in run_copy.iterdir()) == sorted({k.split("/")[0] for k in before})
