"""torchrun: a 2-process job with per-rank logs, kill-and-resume under --max-restarts, a hung rank
that fails the job within the collective timeout, and the command `wb launch torchrun` prints."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpu_workbench.cluster.torchrun import torchrun_command
from tests.cluster.common import JOB, KILL, ROOT, TINY, env, final_params, free_port, losses, max_rel_diff, summary, wb

pytestmark = pytest.mark.slow


def test_two_process_torchrun_job(clean_ddp):
    run_dir, log_dir, seconds = clean_ddp
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["steps"] == 6 and s["resumed_from_step"] == 0
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000006"]   # keep=1
    # one stdout/stderr file per rank: <log_dir>/<run id>/attempt_0/<local rank>/
    ranks = sorted(p.parent.name for p in log_dir.glob("*/attempt_0/*/stdout.log"))
    assert ranks == ["0", "1"], list(log_dir.rglob("*"))
    rank0 = next(log_dir.glob("*/attempt_0/0/stdout.log")).read_text()
    assert "ddp x2: 6 steps" in rank0
    print(f"\n2-process torchrun job: {seconds:.1f} s")


def test_kill_and_resume_under_torchrun(clean_ddp, tmp_path):
    """Rank 1 dies at step 3; torchrun (--max-restarts 1) restarts the group, which resumes from the
    checkpoint after step 2 and ends with the uninterrupted run's parameters and losses."""
    clean = clean_ddp[0]
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    done = wb("train", "--recipe", "ddp", "--nproc", "2", "--max-restarts", "1", "--config", TINY, "--run-dir",
              str(run_dir), *JOB, *KILL)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "exitcode: 17" in done.stderr        # the injected death really happened
    assert "restart 1 of 1 after rank 1 killed at step 3; resumed from step 2" in done.stderr
    assert (run_dir / ".fault_fired").is_file()
    assert summary(run_dir)["resumed_from_step"] == 2
    assert max_rel_diff(final_params(run_dir), final_params(clean)) < 1e-6
    assert losses(run_dir) == pytest.approx(losses(clean), rel=1e-6)
    print(f"\nkill + torchrun restart + resume: {seconds:.1f} s (uninterrupted: {clean_ddp[2]:.1f} s)")


# The rendezvous store as a process of its own, as an etcd or a head node that outlives the workers would be: the
# node hosting torchrun's c10d store cannot be lost (the survivors' agents need it to re-form the group).
STORE = ("import sys, time, torch.distributed as d; s = d.TCPStore('127.0.0.1', int(sys.argv[1]), is_master=True, "
         "wait_for_workers=False); print('up', flush=True); time.sleep(600)")


def _elastic_agent(port: int, run_dir, log: Path) -> subprocess.Popen:
    """One node's agent of an elastic 1:2-node job on this host, a client of the store; a short last call, so
    the survivor goes on alone soon after its peer's heartbeats stop."""
    cmd = [sys.executable, "-m", "gpu_workbench", "launch", "torchrun", "--nnodes", "1:2", "--nproc-per-node", "1",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic", "--max-restarts", "1", "--rdzv-conf",
           "is_host=false,last_call_timeout=8,keep_alive_interval=1,keep_alive_max_attempt=3", "--",
           "wb", "train", "--recipe", "ddp", "--config", TINY, f"run_dir={run_dir}", *JOB, *KILL,
           "fault.kill_host=true"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_elastic_job_survives_a_lost_host(clean_ddp, tmp_path):
    """--nnodes 1:2, one rank per node: rank 1 dies at step 3 with its agent (a host gone for good). The
    survivor's agent restarts, the rendezvous closes with one node, and it resumes the step-2 checkpoint as ddp
    on 1 rank (resharded, the same global batch): the 2-rank uninterrupted run's losses and parameters."""
    port, run_dir = free_port(), tmp_path / "run"
    store = subprocess.Popen([sys.executable, "-c", STORE, str(port)], env=env(), stdout=subprocess.PIPE, text=True)
    logs, agents = [tmp_path / "a.log", tmp_path / "b.log"], []
    try:
        assert store.stdout.readline().strip() == "up"
        agents = [_elastic_agent(port, run_dir, log) for log in logs]
        codes = [a.wait(timeout=240) for a in agents]
    finally:
        for process in (*agents, store):
            process.kill()
    out = [log.read_text() for log in logs]
    survivor = 0 if "resuming step_000002" in out[0] else 1
    assert codes[survivor] == 0 and codes[1 - survivor] != 0, (codes, out[0][-3000:], out[1][-3000:])
    assert "written by ddp on 2 ranks as ddp on 1 rank" in out[survivor]
    s = summary(run_dir)
    assert s["world_size"] == 1 and s["resumed_from_step"] == 2
    assert losses(run_dir) == pytest.approx(losses(clean_ddp[0]), rel=1e-5)
    assert max_rel_diff(final_params(run_dir), final_params(clean_ddp[0])) < 1e-5


def test_hung_rank_fails_within_collective_timeout(tmp_path):
    """`wb launch torchrun` (explicit c10d endpoint, per-rank logs): rank 1 hangs at step 2; rank 0's
    collective times out after 4 s and the job fails with a message naming rank 1."""
    port = free_port()
    log_dir = tmp_path / "logs"
    t0 = time.perf_counter()
    done = wb("launch", "torchrun", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--log-dir",
              str(log_dir), "--local-ranks-filter", "0", "--", "wb", "train", "--recipe", "ddp", "--config", TINY,
              f"run_dir={tmp_path / 'run'}", "steps=6", "progress=false", "checkpoint.every=0",
              "fault.hang_rank=1", "fault.at_step=2", "fault.collective_timeout_s=4", timeout=240)
    seconds = time.perf_counter() - t0
    assert done.returncode != 0
    first = done.stdout.splitlines()[0]   # the command, printed before it runs
    assert first.startswith(f"{sys.executable} -m torch.distributed.run ") and f"127.0.0.1:{port}" in first
    errors = next(log_dir.glob("*/attempt_0/0/stderr.log")).read_text()
    assert "collective timed out after 4s in step 2" in errors and "rank 1 (last at step 1)" in errors, errors[-3000:]
    assert seconds < 120
    print(f"\nhung rank: job failed after {seconds:.1f} s (timeout 4 s)")


def test_launch_command_multinode():
    cmd = torchrun_command(["wb", "train", "--recipe", "fsdp", "name=a b"], nproc_per_node=8, nnodes="2",
                           rdzv_endpoint="head:29500", rdzv_id="job1", max_restarts=3, log_dir="logs",
                           local_ranks_filter="0", python="python")
    assert cmd == ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                   "--rdzv-endpoint=head:29500", "--rdzv-id=job1", "--max-restarts=3", "--log-dir=logs",
                   "--redirects=3", "--tee=3", "--local-ranks-filter=0", "-m", "gpu_workbench", "train", "--recipe",
                   "fsdp", "name=a b"]
    with pytest.raises(ValueError, match="--rdzv-endpoint HOST:PORT is required"):
        torchrun_command(["wb", "train"], nproc_per_node=8, nnodes="2")
    assert torchrun_command(["python", "x.py"], 1)[-1:] == ["x.py"]
    assert torchrun_command(["./run.sh", "a"], 1)[-3:] == ["--no-python", "./run.sh", "a"]


def test_launcher_mistakes_are_one_line():
    done = wb("train", "--recipe", "ddp", "--config", TINY, "--launcher", "slurm", timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["wb: error: --launcher must be 'local' or 'ray', got 'slurm'"]
