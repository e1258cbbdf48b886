"""torchrun command lines: one builder for `wb train --launcher local` and `wb launch torchrun`.

    cmd = torchrun_command(["wb", "train", "--recipe", "ddp"], nproc_per_node=2)          # this node only
    cmd = torchrun_command(entry, nproc_per_node=8, nnodes="2", rdzv_endpoint="head:29500",
                           max_restarts=3, log_dir="runs/x/logs", local_ranks_filter="0")
    code = run(cmd)

Single node: c10d rendezvous on `localhost:0` (the agent picks a free port; this is what
`torchrun --standalone` does, spelled out). Several nodes: c10d on the head's HOST:PORT with a shared
`--rdzv-id`; every node runs the same command. `--max-restarts K` lets torchrun restart the whole
group K times after a worker dies (each restart sets TORCHELASTIC_RESTART_COUNT); the train loop then
resumes from the newest complete checkpoint. `--log-dir D` writes one stdout/stderr file per rank
(`D/<run id>/attempt_<k>/<local rank>/{stdout,stderr}.log`) and still shows them on the console;
`--local-ranks-filter 0` shows only rank 0 there. `--local-addr A` also picks gloo's interface on this
node: the one carrying A (GLOO_SOCKET_IFNAME, unless set; cluster/netif.py).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid

from gpu_workbench.cluster import netif
from gpu_workbench.parallel.runtime.errors import UserError


def entry_args(command: list[str]) -> list[str]:
    """torchrun's trailing arguments for a user command: `wb ...` becomes `-m gpu_workbench ...` (the
    workers run the project's CLI in torchrun's interpreter), `python X ...` becomes `X ...`, anything
    else runs as a program (`--no-python`)."""
    if not command:
        raise UserError("no command to launch: put it after `--`, e.g. -- wb train --recipe ddp")
    head = os.path.basename(command[0])
    if head == "wb":
        return ["-m", "gpu_workbench", *command[1:]]
    if head.startswith("python") or command[0] == sys.executable:
        return command[1:]
    return ["--no-python", *command]


def run_dir_of(command: list[str]) -> str:
    """The run directory the command names (`--run-dir X`, `--run-dir=X` or the override `run_dir=X`), or ""."""
    for i, word in enumerate(command):
        if word == "--run-dir" and i + 1 < len(command):
            return command[i + 1]
        for prefix in ("--run-dir=", "run_dir="):
            if word.startswith(prefix):
                return word[len(prefix):]
    return ""


def torchrun_command(command: list[str], nproc_per_node: int, nnodes: str = "1", rdzv_endpoint: str = "",
                     rdzv_id: str = "", max_restarts: int = 0, local_ranks_filter: str = "", log_dir: str = "",
                     node_rank: int | None = None, python: str = sys.executable, local_addr: str = "",
                     rdzv_conf: str = "", agent: str = "torch.distributed.run") -> list[str]:
    """The exact torchrun command line (as `python -m torch.distributed.run`, so the venv's torch runs;
    `agent`: a module that takes torchrun's arguments, e.g. gpu_workbench.cluster.agent)."""
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    multi = str(nnodes) not in ("1", "1:1")
    if multi and not rdzv_endpoint:
        raise UserError(f"--rdzv-endpoint HOST:PORT is required with --nnodes {nnodes} (the head node's address)")
    if rdzv_endpoint and ":" not in rdzv_endpoint:
        raise UserError(f"--rdzv-endpoint must be HOST:PORT, got '{rdzv_endpoint}'")
    cmd = [python, "-m", agent, f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint or 'localhost:0'}",
           f"--rdzv-id={rdzv_id or ('wb-job' if multi else uuid.uuid4().hex[:12])}",
           f"--max-restarts={max_restarts}"]
    if node_rank is not None:
        cmd.append(f"--node-rank={node_rank}")
    if local_addr:   # the address the other nodes reach this one at (default: its hostname's)
        cmd.append(f"--local-addr={local_addr}")
    if rdzv_conf:    # e.g. is_host=true: this node hosts the c10d store (when its hostname does not tell)
        cmd.append(f"--rdzv-conf={rdzv_conf}")
    if log_dir:
        cmd += [f"--log-dir={log_dir}", "--redirects=3", "--tee=3"]   # files per rank, and the console
    if local_ranks_filter:
        cmd.append(f"--local-ranks-filter={local_ranks_filter}")
    return cmd + entry_args(command)


def worker_env(base: dict | None = None, local_addr: str = "") -> dict:
    """The workers' environment; with --local-addr, gloo binds to the interface carrying that address."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")   # torchrun sets 1 itself but warns; ranks share the cores
    netif.pin_gloo_interface(local_addr, env)
    return env


def run(cmd: list[str], echo: bool = False, local_addr: str = "") -> int:
    """Run a launcher command in the foreground; its exit code (torchrun's: non-zero if the job failed)."""
    if echo:
        print(shlex.join(cmd), flush=True)
    return subprocess.call(cmd, env=worker_env(local_addr=local_addr))
