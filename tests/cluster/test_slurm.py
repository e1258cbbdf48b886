"""`wb slurm render`: the sbatch script parses (bash -n, shellcheck when installed), and run under
stand-in srun/scontrol/python it starts torchrun with the head node as c10d endpoint, per-rank logs,
the user's arguments literal (no shell injection), and requeues itself on USR1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from gpu_workbench.cluster.slurm import render_sbatch, submit
from tests.cluster.common import TINY, wb

PAYLOAD = ["name=$(touch PWNED)", "run_dir=`touch PWNED2`", "tag=it's \"quoted\" ; rm -rf /", "x=a b"]

STUBS = r"""
scontrol() { if [ "$1" = show ]; then printf 'node7\nnode8\n'; else echo "$*" >> "$CALLS"; fi; }
srun() { echo "srun $*" >> "$CALLS"; while [[ "$1" == --* ]]; do shift; done; "$@"; }
python() { printf '%s\0' "$@" > "$ARGS_OUT"; sleep "${STUB_SLEEP:-0}"; }
export -f scontrol srun python
"""


def _render(tmp_path, *extra, job=("--recipe", "ddp", *PAYLOAD), **env):
    script = tmp_path / "job.sbatch"
    done = wb("slurm", "render", "--nodes", "2", "--gpus-per-node", "4", "--time", "02:00:00", "--partition", "gpu",
              "--max-restarts", "2", "--log-dir", str(tmp_path / "logs"), "--out", str(script), *extra,
              "--", "wb", "train", *job, timeout=120, **env)
    return script, done


def test_render_parses_and_runs_torchrun_literally(tmp_path):
    script, done = _render(tmp_path)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    for directive in ("--nodes=2", "--gpus-per-node=4", "--time=02:00:00", "--partition=gpu", "--requeue",
                      "--signal=B:USR1@"):
        assert f"#SBATCH {directive}" in text
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout

    env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[7-8]", SLURM_JOB_NUM_NODES="2",
               CALLS=str(tmp_path / "calls"), ARGS_OUT=str(tmp_path / "args"))
    run = subprocess.run(["bash", "-c", STUBS + f'bash "{script}"'], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "args").read_text().split("\0")[:-1]
    logs = tmp_path / "logs" / "4242"
    assert args == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=node7:29500", "--rdzv-id=4242", "--max-restarts=2", f"--log-dir={logs}",
                    "--redirects=3", "--tee=3", "-m", "gpu_workbench", "train", "--recipe", "ddp", *PAYLOAD]
    assert not list(tmp_path.glob("PWNED*")), "a config value was executed by the shell"
    assert logs.is_dir()
    assert "--ntasks-per-node=1" in (tmp_path / "calls").read_text()


def test_usr1_requeues_the_job(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(["wb", "train"], nodes=1, gpus_per_node=1, time="10", partition="p",
                                    log_dir=str(tmp_path / "logs")))
    env = dict(os.environ, SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node7", SLURM_JOB_NUM_NODES="1",
               CALLS=str(tmp_path / "calls"), ARGS_OUT=str(tmp_path / "args"), STUB_SLEEP="3")
    (tmp_path / "stubs.sh").write_text(STUBS)
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=dict(env, BASH_ENV=str(tmp_path / "stubs.sh")),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "args").exists():   # torchrun (the stand-in) is running
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)   # what Slurm sends ahead of the time limit (--signal=B:USR1@...)
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert "requeue 77" in (tmp_path / "calls").read_text()
    assert "requeueing job 77" in out


def test_submit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))   # no sbatch here
    with pytest.raises(ValueError, match="sbatch not found on PATH"):
        submit(tmp_path / "job.sbatch")
    monkeypatch.undo()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/submitted\necho "Submitted batch job 1"\n')
    (fake / "sbatch").chmod(0o755)
    # --submit checks the job's config first: only real keys (PAYLOAD's tag= and x= are not)
    job = ("--recipe", "ddp", "global_batch=32", "micro_batch=4", *PAYLOAD[:2])
    _, done = _render(tmp_path, "--submit", job=job, PATH=f"{fake}:{os.environ['PATH']}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "submitted").read_text().strip() == str(tmp_path / "job.sbatch")


def test_cpu_node_options_and_environment_record(tmp_path):
    """--gpus-per-node 0: no GPU line; --cpus-per-task = ranks x threads; --mem, --exclusive, --setup lines
    before srun; the job's SLURM_* variables and hosts land in <run dir>/slurm_env.json."""
    script = tmp_path / "job.sbatch"
    done = wb("slurm", "render", "--gpus-per-node", "0", "--nproc-per-node", "2", "--threads-per-rank", "3",
              "--mem", "8G", "--exclusive", "--setup", "export SETUP_RAN=yes", "--log-dir", str(tmp_path / "logs"),
              "--out", str(script), "--", "wb", "train", "--run-dir", str(tmp_path / "run"), timeout=120)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert "gpus" not in text and "gres" not in text
    for directive in ("--cpus-per-task=6", "--mem=8G", "--exclusive"):
        assert f"#SBATCH {directive}" in text
    assert text.index("export SETUP_RAN=yes") < text.index("\nsrun ")
    env = dict(os.environ, SLURM_JOB_ID="9", SLURM_JOB_NODELIST="node7", SLURM_JOB_NUM_NODES="1",
               CALLS=str(tmp_path / "calls"), ARGS_OUT=str(tmp_path / "args"))
    run = subprocess.run(["bash", "-c", STUBS + f'bash "{script}"'], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "args").read_text().split("\0")[:-1]
    assert "--nproc-per-node=2" in args
    (start,) = json.loads((tmp_path / "run" / "slurm_env.json").read_text())["starts"]
    assert start["hostnames"] == ["node7", "node8"]   # the stand-in scontrol's hosts
    assert start["env"]["SLURM_JOB_ID"] == "9"


@pytest.mark.parametrize("args, message", [
    (["--mem", "lots"], "--mem: 'lots' is not valid"),
    (["--threads-per-rank", "0"], "--threads-per-rank >= 1"),
    (["--setup", " "], "--setup must be one non-empty shell line"),
])
def test_bad_values_are_one_line(args, message):
    done = wb("slurm", "render", "--out", "/tmp/wb-unused.sbatch", *args, "--", "wb", "train", timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert message in line


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An sbatch first on PATH that records each submission in <tmp_path>/submitted."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/submitted\n')
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    return tmp_path / "submitted"


@pytest.mark.parametrize("render, job, message", [
    (["--submit"], ["stepz=5"], "the job's wb train on 8 rank(s): unknown config key 'stepz' (did you mean 'steps'?)"),
    (["--submit", "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "3"], ["--recipe", "ddp"],
     "the job's wb train on 6 rank(s): global_batch (16) must be divisible by micro_batch (4) x data-parallel"),
    (["--submit"], ["--recipz", "ddp"], "the job's wb train: No such option: --recipz"),
    (["--nproc-per-node", "0"], [], "--nproc-per-node must be >= 1 (leave it out for one per GPU), got 0"),
])
def test_the_job_is_checked_before_anything_is_queued(render, job, message, tmp_path, fake_sbatch, capsys):
    from gpu_workbench.cli.app import main

    script = tmp_path / "job.sbatch"
    with pytest.raises(SystemExit) as exit_:
        main(["slurm", "render", "--out", str(script), *render, "--", "wb", "train", "--config", TINY, *job])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("wb: error: "), err
    assert message in err, err
    assert not script.exists() and not fake_sbatch.exists()


def test_a_job_that_passes_its_checks_is_queued(tmp_path, fake_sbatch, capsys):
    from gpu_workbench.cli.app import main

    script = tmp_path / "job.sbatch"
    with pytest.raises(SystemExit) as exit_:
        main(["slurm", "render", "--submit", "--nodes", "2", "--gpus-per-node", "2", "--out", str(script), "--",
              "wb", "train", "--config", TINY, "--recipe", "ddp", f"run_dir={tmp_path / 'run'}"])
    assert not exit_.value.code, capsys.readouterr().err
    assert fake_sbatch.read_text().strip() == str(script)
    assert "--nproc-per-node=2" in script.read_text()


def test_the_failing_node_is_the_task_srun_reported(tmp_path):
    """Two nodes: srun's batch-log line names task 1, so node-1.out is the failing node's log, and its last
    error line is its last `wb: error:` line without torchrun's rank prefixes (else a traceback's last line)."""
    from gpu_workbench.cluster.slurm_outcome import failing_node_log, last_error_line

    (tmp_path / "node-0.out").write_text("[default0]:[rank0]: Traceback (most recent call last):\n"
                                         "[default0]:[rank0]: RuntimeError: Connection closed by peer\n")
    (tmp_path / "node-1.out").write_text("[default0]:wb: error: first\n[default1]:wb: error: rank 3's\nbye\n")
    batch = ["wb: job 7 on 2 node(s)", "srun: error: hostb: task 1: Exited with exit code 2"]
    assert failing_node_log(tmp_path, batch) == tmp_path / "node-1.out"
    assert last_error_line((tmp_path / "node-1.out").read_text().splitlines()) == "wb: error: rank 3's"
    assert last_error_line((tmp_path / "node-0.out").read_text().splitlines()) == \
        "RuntimeError: Connection closed by peer"
    assert failing_node_log(tmp_path, []) == tmp_path / "node-0.out"   # no srun line: the first with an error
