"""`wb slurm render`: an sbatch script that runs one training job as `srun torchrun` on N nodes.

    text = render_sbatch(["wb", "train", "--recipe", "fsdp", "steps=1000"], nodes=2, gpus_per_node=8,
                         time="04:00:00", partition="gpu")

- One task per node (`srun --ntasks-per-node=1`); each runs torchrun with G processes. The c10d
  rendezvous endpoint is the first host of the allocation (`scontrol show hostnames`), the
  rendezvous id the job id, so every node joins the same group.
- Logs: one file per rank under `<log_dir>/<job id>/` (torchrun --log-dir, --redirects/--tee), one
  per node from srun, and the batch log.
- Preemption / time limit: `--requeue`, and `--signal=B:USR1@<s>` makes Slurm signal the batch shell
  ahead of the limit; the trap requeues the job (`scontrol requeue`), which starts again from the
  newest complete checkpoint (the train loop resumes by itself). torchrun `--max-restarts` covers a
  worker lost inside the allocation.
- Every argument of the user's command is quoted with `shlex.quote`: a config value such as
  `name=$(rm -rf /)` reaches the program literally, never the shell.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from cluster.torchrun import entry_args, torchrun_command
from parallel.errors import UserError

_HEAD, _JOB, _LOGS = "WBHEADNODE", "WBJOBID", "WBLOGDIR"   # placeholders, replaced by shell variables


def _check(name: str, value: str, pattern: str, example: str) -> str:
    if not re.fullmatch(pattern, str(value)):
        raise UserError(f"{name}: '{value}' is not valid (e.g. {example})")
    return str(value)


def render_sbatch(command: list[str], nodes: int, gpus_per_node: int, time: str, partition: str,
                  job_name: str = "wb-train", log_dir: str = "runs/slurm", max_restarts: int = 0, port: int = 29500,
                  cpus_per_task: int = 0, account: str = "", signal_lead_s: int = 120) -> str:
    _check_args(nodes, gpus_per_node, time, partition, job_name, account, port)
    srun_args = _srun_args(command, nodes, max(gpus_per_node, 1), port, max_restarts)
    directives = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--time={time}",
                  f"--partition={partition}"]
    if gpus_per_node:
        directives.append(f"--gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        directives.append(f"--cpus-per-task={cpus_per_task}")
    if account:
        directives.append(f"--account={account}")
    directives += [f"--output={log_dir}/%x-%j.out", "--requeue", "--open-mode=append",
                   f"--signal=B:USR1@{signal_lead_s}"]
    header = ["#!/bin/bash", f"# rendered by `wb slurm render`: {shlex.join(command)}"[:1000].replace("\n", " ")]
    return "\n".join([*header, *(f"#SBATCH {d}" for d in directives), *_body(log_dir, srun_args)])


def _check_args(nodes: int, gpus_per_node: int, time: str, partition: str, job_name: str, account: str,
                port: int) -> None:
    if nodes < 1 or gpus_per_node < 0:
        raise UserError(f"--nodes must be >= 1 and --gpus-per-node >= 0, got {nodes} and {gpus_per_node}")
    _check("--time", time, r"(\d+-)?\d{1,2}(:\d{2}){0,2}", "04:00:00 or 1-00:00:00")
    _check("--partition", partition, r"[\w.,-]+", "gpu")
    _check("--job-name", job_name, r"[\w.-]+", "wb-train")
    if account:
        _check("--account", account, r"[\w.-]+", "myproject")
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {port}")


def _srun_args(command: list[str], nodes: int, per_node: int, port: int, max_restarts: int) -> list[str]:
    """torchrun's words for srun: its flags with the placeholders as shell variables, the job's quoted."""
    launch = torchrun_command(command, nproc_per_node=per_node, nnodes=str(nodes), rdzv_endpoint=f"{_HEAD}:{port}",
                              rdzv_id=_JOB, max_restarts=max_restarts, log_dir=f"{_LOGS}/{_JOB}", python="python")
    n_job = len(entry_args(command))
    flags = []
    for arg in launch[3:-n_job]:   # torchrun's own flags: only they carry the placeholders
        q = shlex.quote(arg)
        if _HEAD in arg or _LOGS in arg or _JOB in arg:   # placeholder-only words: no quoting needed before
            q = q.replace(_HEAD, "${HEAD_NODE}").replace(_LOGS, "${LOG_DIR}").replace(_JOB, "${SLURM_JOB_ID}")
            q = f'"{q}"'
        flags.append(q)
    job = shlex.join(launch[-n_job:])   # the user's command: every word quoted, nothing expands
    return [shlex.join(launch[:3]), *flags, job]


def _body(log_dir: str, srun_args: list[str]) -> list[str]:
    return [
        "set -euo pipefail",
        "",
        "# The c10d rendezvous runs on the first host of the allocation.",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"LOG_DIR={shlex.quote(log_dir)}",
        'mkdir -p "$LOG_DIR/$SLURM_JOB_ID"',
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        'echo "wb: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s), head $HEAD_NODE,'
        ' restart ${SLURM_RESTART_COUNT:-0}"',
        "",
        "# Time limit or preemption: Slurm sends USR1 ahead of it; requeue, and the job resumes from",
        "# the newest complete checkpoint when it runs again.",
        "# shellcheck disable=SC2317  # called by the trap",
        "requeue() {",
        '    echo "wb: USR1 received: requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "}",
        "trap requeue USR1",
        "",
        "# One torchrun per node; per-rank logs under $LOG_DIR/$SLURM_JOB_ID.",
        "# shellcheck disable=SC2016  # the job's arguments are single-quoted on purpose: they stay literal",
        'srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output="$LOG_DIR/$SLURM_JOB_ID/node-%n.out" \\',
        "    " + " \\\n    ".join(srun_args) + " &",
        "SRUN_PID=$!",
        'while kill -0 "$SRUN_PID" 2>/dev/null; do   # a trap interrupts wait: keep waiting for srun',
        '    wait "$SRUN_PID" || true',
        "done",
        "status=0",
        'wait "$SRUN_PID" || status=$?   # srun\'s own exit status',
        'exit "$status"',
        "",
    ]


def submit(script: Path) -> int:
    """`sbatch SCRIPT` when sbatch is installed; otherwise a UserError saying how to submit by hand."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(f"sbatch not found on PATH: the script is at {script}; submit it with "
                         f"`sbatch {shlex.quote(str(script))}` on a Slurm login node")
    return subprocess.call([sbatch, str(script)])
