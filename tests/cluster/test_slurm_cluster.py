"""`wb slurm render --submit` on a real single-node Slurm cluster (scripts/slurm_local.sh; docs/ARCHITECTURE.md,
Slurm test cluster): a 2-process ddp job runs to completion with the uninterrupted run's losses; `scontrol
requeue` mid-run resumes from the newest checkpoint and ends bit-identical; `scancel` ends a job cleanly.

Nothing here compares times, so it runs in `make test`'s parallel phase (other tests only slow the job down).
The module skips (with the script's one-line reason) only where the cluster cannot run here: not root, or no
apt-get with the packages missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from gpu_workbench.parallel.checkpoint import complete_checkpoints
from gpu_workbench.parallel.runtime.rundir import read_metrics
from tests.cluster.common import JOB, ROOT, TINY, final_params, free_port, losses, max_rel_diff, summary, wb

pytestmark = pytest.mark.slurm

SCRIPT = str(ROOT / "scripts" / "slurm_local.sh")
SLOW = ["straggler.rank=1", "straggler.factor=10"]   # ~0.6 s a step: time to act while the job runs


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The cluster up (left up if it already was, e.g. by `make test`): the env for its clients."""
    was_up = subprocess.run(["bash", SCRIPT, "status"], capture_output=True).returncode == 0
    t0 = time.perf_counter()
    done = subprocess.run(["bash", SCRIPT, "up"], capture_output=True, text=True, timeout=900)
    if done.returncode == 3:
        reason = done.stderr.strip().splitlines() or ["exit 3: it cannot run here"]
        pytest.skip(reason[-1])   # the script's one-line reason (not root, no apt-get / ip)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"\nslurm_local.sh up: {time.perf_counter() - t0:.1f} s")
    conf = re.search(r"SLURM_CONF=(\S+)", done.stdout).group(1)
    yield {"SLURM_CONF": conf}
    if not was_up:
        subprocess.run(["bash", SCRIPT, "down"], capture_output=True, timeout=120)


def _submit(slurm, tmp_path, *extra) -> tuple[str, Path]:
    run_dir = tmp_path / "run"
    done = wb("slurm", "render", "--gpus-per-node", "0", "--nproc-per-node", "2", "--partition", "debug",
              "--time", "10", "--port", str(free_port()), "--log-dir", str(tmp_path / "logs"), "--submit",
              "--", "wb", "train", "--recipe", "ddp", "--config", TINY, "--run-dir", str(run_dir), *JOB, *extra,
              timeout=60, env=slurm)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"Submitted batch job (\d+)", done.stdout).group(1), run_dir


def _job(slurm, job_id) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         env={**os.environ, **slurm}, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(what, predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def _ended(slurm, job_id, state):
    job = _wait(f"job {job_id} to end", lambda: (j := _job(slurm, job_id))["JobState"] in
                ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") and j)
    assert job["JobState"] == state, (job, _logs(job))
    return job


def _logs(job) -> str:
    path = Path(job.get("StdOut", ""))
    text = path.read_text()[-3000:] if path.is_file() else ""
    for node in path.parent.glob(f"{job['JobId']}/node-*.out"):
        text += node.read_text()[-3000:]
    return text


def _rank_processes(run_dir) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(run_dir) in line]


def test_job_runs_to_completion(slurm, clean_ddp, tmp_path):
    t0 = time.perf_counter()
    job_id, run_dir = _submit(slurm, tmp_path)
    _ended(slurm, job_id, "COMPLETED")
    print(f"\nslurm job: {time.perf_counter() - t0:.1f} s (uninterrupted torchrun: {clean_ddp[2]:.1f} s)")
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["steps"] == 6 and s["resumed_from_step"] == 0
    assert losses(run_dir) == pytest.approx(losses(clean_ddp[0]), rel=1e-6)
    assert max_rel_diff(final_params(run_dir), final_params(clean_ddp[0])) < 1e-6
    (start,) = json.loads((run_dir / "slurm_env.json").read_text())["starts"]
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert start["hostnames"] == [host] and start["env"]["SLURM_JOB_ID"] == job_id
    assert start["env"]["SLURM_CPUS_PER_TASK"] == "2"   # ranks per node x threads per rank


def test_requeue_resumes_from_newest_checkpoint(slurm, clean_ddp, tmp_path):
    t0 = time.perf_counter()
    job_id, run_dir = _submit(slurm, tmp_path, *SLOW)
    _wait("the checkpoint after step 2", lambda: (run_dir / "checkpoints" / "step_000002").is_dir(), timeout=90)
    assert _job(slurm, job_id)["JobState"] == "RUNNING"
    requeue = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                             env={**os.environ, **slurm})
    assert requeue.returncode == 0, requeue.stderr
    job = _ended(slurm, job_id, "COMPLETED")
    print(f"\nslurm job, requeued once: {time.perf_counter() - t0:.1f} s")
    assert job["Restarts"] == "1"
    starts = json.loads((run_dir / "slurm_env.json").read_text())["starts"]
    assert [s["env"].get("SLURM_RESTART_COUNT", "0") for s in starts] == ["0", "1"]
    assert 2 <= summary(run_dir)["resumed_from_step"] < 6   # the newest checkpoint when the job was requeued
    assert max_rel_diff(final_params(run_dir), final_params(clean_ddp[0])) < 1e-6
    assert losses(run_dir) == pytest.approx(losses(clean_ddp[0]), rel=1e-6)


def test_scancel_ends_the_job_cleanly(slurm, tmp_path):
    job_id, run_dir = _submit(slurm, tmp_path, *SLOW)
    _wait("two steps", lambda: len(losses(run_dir)) >= 2, timeout=90)
    cancel = subprocess.run(["scancel", job_id], capture_output=True, text=True, env={**os.environ, **slurm})
    assert cancel.returncode == 0, cancel.stderr
    _ended(slurm, job_id, "CANCELLED")
    assert _wait("no rank processes", lambda: not _rank_processes(run_dir), timeout=30)
    done = [m["step"] for m in read_metrics(run_dir)]
    assert 2 <= len(done) < 6 and done == list(range(len(done)))   # only the steps that ran, in order
    assert not (run_dir / "summary.json").exists() and not (run_dir / "final_model.pt").exists()
    # complete checkpoints only of steps that ran (one cut short by the cancel stays step_N.tmp, never resumed)
    saved = [int(p.name.split("_")[1]) for p in complete_checkpoints(run_dir)]
    assert all(step <= len(done) for step in saved), saved
