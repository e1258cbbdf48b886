"""`wb launch torchrun`, `wb ray submit`, `wb slurm render`: the launchers of `cluster/` on the CLI.

Each takes the job's own command after `--`, e.g. `wb launch torchrun --nproc-per-node 8 -- wb train
--recipe fsdp steps=1000`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from gpu_workbench.cli.paths import output_file
from gpu_workbench.parallel.runtime.errors import UserError

launch_app = typer.Typer(no_args_is_help=True, help="Launch a job under torchrun (single or multi-node).")
ray_app = typer.Typer(no_args_is_help=True, help="Ray cluster jobs.")
slurm_app = typer.Typer(no_args_is_help=True, help="Slurm batch scripts.")

_CMD = typer.Argument(None, help="the job's command, after `--` (e.g. -- wb train --recipe ddp)")


@launch_app.command("torchrun")
def launch_torchrun(
    command: list[str] = _CMD,
    nnodes: str = typer.Option("1", "--nnodes", help="nodes, or MIN:MAX for an elastic job"),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="processes (GPUs) per node"),
    rdzv_endpoint: str = typer.Option("", "--rdzv-endpoint", help="HOST:PORT of the head node (c10d rendezvous); "
                                                                  "default localhost:0 on one node"),
    rdzv_id: str = typer.Option("", "--rdzv-id", help="job id shared by all nodes (default: random on one node)"),
    node_rank: int = typer.Option(None, "--node-rank", help="this node's rank (optional with c10d)"),
    local_addr: str = typer.Option("", "--local-addr", help="the address other nodes reach this one at "
                                                            "(default: what its hostname resolves to)"),
    rdzv_conf: str = typer.Option("", "--rdzv-conf", help="c10d options, e.g. is_host=true on the head node when "
                                                          "its hostname does not resolve to the endpoint"),
    max_restarts: int = typer.Option(0, "--max-restarts", help="restarts of the worker group after a failure"),
    local_ranks_filter: str = typer.Option("", "--local-ranks-filter", help="console shows only these local ranks"),
    log_dir: str = typer.Option("", "--log-dir", help="one stdout/stderr log file per rank under here"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the torchrun command, do not run it"),
) -> None:
    """Print the exact torchrun command (so it can be copied to other nodes), then run it."""
    from gpu_workbench.cluster import torchrun

    cmd = torchrun.torchrun_command(list(command or []), nproc_per_node=nproc_per_node, nnodes=nnodes,
                                    rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, max_restarts=max_restarts,
                                    local_ranks_filter=local_ranks_filter, log_dir=log_dir, node_rank=node_rank,
                                    local_addr=local_addr, rdzv_conf=rdzv_conf)
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return
    code = torchrun.run(cmd, local_addr=local_addr)
    if code:
        raise typer.Exit(code)


@ray_app.command("submit")
def ray_submit(
    command: list[str] = _CMD,
    address: str = typer.Option(None, "--address", help="the cluster's dashboard, e.g. http://127.0.0.1:8265 "
                                                        "(default RAY_API_SERVER_ADDRESS / RAY_ADDRESS)"),
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="uploaded as the job's working_dir"),
    env: list[str] = typer.Option(None, "--env", help="KEY=VALUE for the job's runtime env (repeatable)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="submit and return without following the logs"),
    timeout: float = typer.Option(0, "--timeout", help="stop the job after this many seconds (0 = no limit)"),
) -> None:
    """Submit a command to a running Ray cluster (`ray job submit` semantics); exit 0 iff it succeeded."""
    from gpu_workbench.cluster.ray_submit import submit_job

    env_vars = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env '{item}' must look like KEY=VALUE")
        env_vars[key] = value
    code = submit_job(list(command or []), address=address, working_dir=working_dir, env_vars=env_vars,
                      wait=not no_wait, timeout_s=timeout)
    if code:
        raise typer.Exit(code)


@slurm_app.command("render")
def slurm_render(
    command: list[str] = _CMD,
    nodes: int = typer.Option(1, "--nodes", help="nodes in the allocation"),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs (and torchrun processes) per node"),
    time: str = typer.Option("01:00:00", "--time", help="time limit, e.g. 04:00:00"),
    partition: str = typer.Option("gpu", "--partition", help="Slurm partition"),
    job_name: str = typer.Option("wb-train", "--job-name"),
    account: str = typer.Option("", "--account"),
    nproc_per_node: int = typer.Option(None, "--nproc-per-node", help="torchrun processes per node (default: one "
                                                                      "per GPU, one without GPUs)"),
    threads_per_rank: int = typer.Option(1, "--threads-per-rank", help="OMP_NUM_THREADS of each rank"),
    cpus_per_task: int = typer.Option(0, "--cpus-per-task", help="CPUs for each node's torchrun "
                                                                 "(0 = processes per node x threads per rank)"),
    mem: str = typer.Option("", "--mem", help="memory per node, e.g. 64G (0 = all of it; default: the site's)"),
    exclusive: bool = typer.Option(False, "--exclusive", help="the nodes are not shared with other jobs"),
    setup: list[str] = typer.Option(None, "--setup", help="a shell line run before srun, e.g. "
                                                          "'source .venv/bin/activate' (repeatable)"),
    max_restarts: int = typer.Option(0, "--max-restarts", help="torchrun restarts after a lost worker"),
    port: int = typer.Option(29500, "--port", help="c10d rendezvous port on the head node"),
    log_dir: str = typer.Option("runs/slurm", "--log-dir", help="batch, node and per-rank logs"),
    out: Path = typer.Option(None, "--out", help="script path (default <log-dir>/<job-name>.sbatch)"),
    submit: bool = typer.Option(False, "--submit", help="pass the script to sbatch"),
    wait: bool = typer.Option(False, "--wait", help="with --submit: return when the job ends, with its exit status"),
) -> None:
    """Write an sbatch script that runs the command as `srun torchrun` on every node."""
    from gpu_workbench.cluster import slurm
    from gpu_workbench.cluster.torchrun import run_dir_of

    command = list(command or [])
    if nproc_per_node is not None and nproc_per_node < 1:   # 0 would silently become one per GPU
        raise UserError(f"--nproc-per-node must be >= 1 (leave it out for one per GPU), got {nproc_per_node}")
    text = slurm.render_sbatch(command, nodes=nodes, gpus_per_node=gpus_per_node, time=time, partition=partition,
                               job_name=job_name, log_dir=log_dir, max_restarts=max_restarts, port=port,
                               cpus_per_task=cpus_per_task, account=account, nproc_per_node=nproc_per_node or 0,
                               threads_per_rank=threads_per_rank, mem=mem, exclusive=exclusive, setup=setup or [])
    if submit:   # a job that would fail its own checks is refused before anything is queued
        from gpu_workbench.cli.train_args import check_job

        check_job(command, world_size=nodes * slurm.ranks_per_node(nproc_per_node or 0, gpus_per_node))
    path = output_file(out, "--out") if out else output_file(Path(log_dir) / f"{job_name}.sbatch", "--log-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    print(f"wrote {path}")
    if not run_dir_of(command):
        print("wb: note: the command names no run directory (run_dir=...): a requeued job starts over instead of "
              "resuming", file=sys.stderr)
    if submit:
        code = slurm.submit(path, wait=wait)
        if code:
            raise typer.Exit(code)
