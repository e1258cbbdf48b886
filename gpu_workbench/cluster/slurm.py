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

from gpu_workbench.cluster.torchrun import entry_args, run_dir_of, torchrun_command
from gpu_workbench.parallel.runtime.errors import UserError

_HEAD, _JOB, _LOGS = "WBHEADNODE", "WBJOBID", "WBLOGDIR"   # placeholders, replaced by shell variables


def _check(name: str, value: str, pattern: str, example: str) -> str:
    if not re.fullmatch(pattern, str(value)):
        raise UserError(f"{name}: '{value}' is not valid (e.g. {example})")
    return str(value)


def render_sbatch(command: list[str], nodes: int, gpus_per_node: int, time: str, partition: str,
                  job_name: str = "wb-train", log_dir: str = "runs/slurm", max_restarts: int = 0, port: int = 29500,
                  cpus_per_task: int = 0, account: str = "", signal_lead_s: int = 120, nproc_per_node: int = 0,
                  threads_per_rank: int = 1, mem: str = "", exclusive: bool = False,
                  setup: list[str] | tuple[str, ...] = ()) -> str:
    """The script's text. `nproc_per_node` 0 = one rank per GPU (one without GPUs); `cpus_per_task` 0 =
    ranks per node x `threads_per_rank`; `setup`: shell lines run before srun (e.g. `source .venv/bin/activate`)."""
    _check_args(nodes, gpus_per_node, time, partition, job_name, account, port)
    _check_resources(nproc_per_node, threads_per_rank, cpus_per_task, mem, setup)
    per_node = ranks_per_node(nproc_per_node, gpus_per_node)
    cpus = cpus_per_task or per_node * threads_per_rank
    srun_args = _srun_args(command, nodes, per_node, port, max_restarts)
    directives = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--time={time}",
                  f"--partition={partition}"]
    if gpus_per_node:   # none on a CPU-only node: a --gpus-per-node=0 / --gres line fails there
        directives.append(f"--gpus-per-node={gpus_per_node}")
    directives.append(f"--cpus-per-task={cpus}")
    if mem:
        directives.append(f"--mem={mem}")
    if exclusive:
        directives.append("--exclusive")
    if account:
        directives.append(f"--account={account}")
    directives += [f"--output={log_dir}/%x-%j.out", "--requeue", "--open-mode=append",
                   f"--signal=B:USR1@{signal_lead_s}"]
    header = ["#!/bin/bash", f"# rendered by `wb slurm render`: {shlex.join(command)}"[:1000].replace("\n", " ")]
    body = _body(log_dir, run_dir_of(command), threads_per_rank, list(setup), cpus, srun_args)
    return "\n".join([*header, *(f"#SBATCH {d}" for d in directives), *body])


def ranks_per_node(nproc_per_node: int, gpus_per_node: int) -> int:
    """torchrun's processes on each node: as asked, else one per GPU (one on a node without GPUs)."""
    return nproc_per_node or max(gpus_per_node, 1)


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


def _check_resources(nproc_per_node: int, threads_per_rank: int, cpus_per_task: int, mem: str, setup) -> None:
    if nproc_per_node < 0 or cpus_per_task < 0 or threads_per_rank < 1:
        raise UserError(f"--nproc-per-node and --cpus-per-task must be >= 0 and --threads-per-rank >= 1, got "
                        f"{nproc_per_node}, {cpus_per_task} and {threads_per_rank}")
    if mem:
        _check("--mem", mem, r"\d+[KMGT]?", "64G or 0 (all of the node's memory)")
    for line in setup:
        if not line.strip() or "\n" in line or "\r" in line:
            raise UserError(f"--setup must be one non-empty shell line, got {line!r}")


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


# The job's environment, for the record: one entry per start of the job (a requeue adds one), with the
# hosts of the allocation. Standard library only, so any python3 will do.
_RECORD = """import json, os, socket, sys
from pathlib import Path
path = Path(sys.argv[1]) / "slurm_env.json"
path.parent.mkdir(parents=True, exist_ok=True)
starts = json.loads(path.read_text())["starts"] if path.exists() else []
starts.append({"batch_host": socket.gethostname(), "hostnames": sys.argv[2:],
               "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SLURM_")}})
tmp = path.with_name(path.name + ".tmp")
tmp.write_text(json.dumps({"starts": starts}, indent=2) + "\\n")
tmp.replace(path)"""


def _body(log_dir: str, run_dir: str, threads: int, setup: list[str], cpus: int, srun_args: list[str]) -> list[str]:
    record_dir = shlex.quote(run_dir) if run_dir else '"$LOG_DIR/$SLURM_JOB_ID"'
    return [
        "set -euo pipefail",
        "",
        "# The c10d rendezvous runs on the first host of the allocation.",
        'mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'HEAD_NODE=${HOSTS[0]}',
        f"LOG_DIR={shlex.quote(log_dir)}",
        'mkdir -p "$LOG_DIR/$SLURM_JOB_ID"',
        f"export OMP_NUM_THREADS={threads}",
        'echo "wb: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s), head $HEAD_NODE,'
        ' restart ${SLURM_RESTART_COUNT:-0}"',
        *(["", "# --setup: the job's environment (the user's lines, as given)"] if setup else []),
        *(x for line in setup for x in ("# shellcheck disable=SC1090,SC1091  # may source a file", line)),
        "",
        "# SLURM_* variables and the hosts -> slurm_env.json (a failure here does not stop the job)",
        "# shellcheck disable=SC2016  # the run directory is single-quoted on purpose: it stays literal",
        f"python3 - {record_dir} \"${{HOSTS[@]}}\" <<'PY' || echo \"wb: warning: slurm_env.json not written\" >&2",
        _RECORD,
        "PY",
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
        f'srun --ntasks-per-node=1 --cpus-per-task={cpus} --kill-on-bad-exit=1 \\',
        '    --output="$LOG_DIR/$SLURM_JOB_ID/node-%n.out" \\',
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


def submit(script: Path, wait: bool = False) -> int:
    """`sbatch SCRIPT` (`--wait`: until the job ends, its exit status) when sbatch is installed; otherwise a
    UserError saying how to submit by hand."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(f"sbatch not found on PATH: the script is at {script}; submit it with "
                         f"`sbatch {shlex.quote(str(script))}` on a Slurm login node")
    return subprocess.call([sbatch, *(["--wait"] if wait else []), str(script)])
