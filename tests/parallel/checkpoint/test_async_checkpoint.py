"""checkpoint.async_save: the loop waits only while the state is staged in host memory; the checkpoint is
published (meta.json, the rename) only when its background write has finished. A SIGKILL during that write
(fault.checkpoint_write_delay_s holds it open deterministically) leaves the previous checkpoint as the
newest complete one, and the resume ends bit-identical to an uninterrupted run.

Three launches: the reference in this process (synchronous saves), the async run under `wb train`, killed
mid-write, and its resume in this process.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers.cli import ROOT, env
from tests.helpers.runs import TINY, final_params, losses, summary

pytestmark = pytest.mark.slow

BASE = ["progress=false", "steps=8", "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.save_final=true",
        "optim.warmup_steps=2", "model.d_model=32", "model.n_layers=1"]
DELAY_S = 1.5   # step 4 starts writing within milliseconds of step 2 landing; the poll sees it in 10 ms


def _train_here(*overrides: str) -> None:
    """In this process, on one intra-op thread as the CLI run (tests.helpers.cli.env): the same float reductions."""
    from gpu_workbench.parallel import RunConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            train(RunConfig.from_toml(TINY, [*BASE, *overrides]))
    finally:
        torch.set_num_threads(threads)


def _kill_during_the_second_write(run_dir) -> dict:
    """Start the async run; SIGKILL it while step 4's background write is held open; what it left."""
    cmd = [sys.executable, "-m", "gpu_workbench", "train", "--config", TINY, *BASE, "checkpoint.async_save=true",
           f"fault.checkpoint_write_delay_s={DELAY_S}", f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts, t0 = run_dir / "checkpoints", time.time()
    try:
        while not (ckpts / "step_000004.tmp" / "trainer_rank0.pt").exists():   # staged, its write begun
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() - t0 < 120, "step 4's save never started"
            time.sleep(0.01)
        seen = {"complete": sorted(p.name for p in ckpts.iterdir() if not p.name.endswith(".tmp")),
                "tmp_data": sorted(p.name for p in (ckpts / "step_000004.tmp").rglob("*") if p.is_file())}
    finally:
        proc.kill()
        proc.wait()
    return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    _train_here(f"run_dir={root / 'ref'}")
    seen = _kill_during_the_second_write(root / "async")
    _train_here(f"run_dir={root / 'async'}", "checkpoint.async_save=true")
    return root, seen


def test_a_kill_during_the_background_write_leaves_the_previous_checkpoint(runs):
    _, seen = runs
    assert seen["complete"] == ["step_000002"]   # published once its write ended, before step 4's began
    assert "meta.json" not in seen["tmp_data"] and not any(n.endswith(".distcp") for n in seen["tmp_data"])


def test_the_resume_equals_the_uninterrupted_run_bit_for_bit(runs):
    root, _ = runs
    assert summary(root / "async")["resumed_from_step"] == 2
    assert losses(root / "async") == losses(root / "ref")
    a, b = final_params(root / "async"), final_params(root / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert sorted(p.name for p in (root / "async" / "checkpoints").iterdir()) == ["step_000006", "step_000008"]
