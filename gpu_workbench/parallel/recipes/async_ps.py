"""`async-ps`: a parameter server on Ray actors, with bounded staleness (SSP).

    wb train --recipe async-ps --nproc 4 ps.staleness=4 ps.shards=2 [--ray-address auto]

The driver (this process) starts `ps.shards` server actors (parallel/recipes/ps/server.py), each owning a
slice of the parameters and their AdamW state, and N = --nproc worker actors (parallel/recipes/ps/worker.py)
that loop pull -> compute -> push over `steps` clocks. `ps.staleness` bounds how far a worker may run
ahead of the slowest (0 = synchronous: each clock's N gradients are averaged into one update, the
same step as ddp's). It then waits on the workers' run() calls; a worker actor that dies is replaced
by a new actor that resumes at its last acknowledged clock (`ps.on_worker_death = "replace"`) or
dropped from the staleness bound and the sync rounds ("drop"). Updates already acknowledged live on the
server, which never died, so none is lost.

The server shards are not replicated: a shard that dies ends the run with an error (no server
checkpoints yet).

Ray: an embedded local instance by default (started here, shut down at the end), an existing cluster
with `ps.ray_address` (`--ray-address`), or whatever `ray.init()` the caller already made (tests).
Actors ask for no CPUs (num_cpus=0): the tiny model needs none reserved, and N workers + shards may
outnumber the cores. Workers are spread over the cluster's nodes where there are several.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.models.transformer import build, count_params
from gpu_workbench.parallel.recipes.base import Recipe
from gpu_workbench.parallel.recipes.ps.report import WorkerRun, write_run
from gpu_workbench.parallel.recipes.ps.server import ParamShard
from gpu_workbench.parallel.recipes.ps.worker import PSWorker
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.local_ray import start_local_ray
from gpu_workbench.parallel.runtime.rundir import RunDir, resolve_run_dir
from gpu_workbench.parallel.runtime.summary import AsyncStats, RunSummary


def _ray_session(cfg: RunConfig) -> bool:
    """Connect to (or start) Ray; True when this call started it and must shut it down."""
    try:
        import ray
    except ImportError:
        raise UserError("recipe async-ps needs Ray: pip install 'ray[default]'") from None

    if ray.is_initialized():
        return False
    root = str(Path(__file__).resolve().parents[3])   # actors import the project from here
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}}
    if cfg.ps.ray_address:
        ray.init(address=cfg.ps.ray_address, runtime_env=env, log_to_driver=False)
    else:
        start_local_ray(2, runtime_env=env, log_to_driver=False)
    return True


class AsyncPS(Recipe):
    execution = "ray-actors"
    checkpoint_modes = "its Ray workers write no checkpoints"
    timeline = ("its Ray parameter-server workers move tensors as Ray objects, not torch.distributed collectives, "
                "outside the train loop that records the timeline (their pull/push times are in summary.json); "
                "run it without --timeline")
    evaluation = "its Ray workers train outside the train loop that evaluates; run it with eval.every=0"
    tensor_parallel = "the parameter server holds whole tensors per worker; tensor parallelism needs spmd ranks"

    def run(self, cfg: RunConfig, nproc: int) -> RunSummary:
        import ray

        started = _ray_session(cfg)
        try:
            return _train(cfg, nproc)
        finally:
            if started:
                ray.shutdown()


def _train(cfg: RunConfig, n: int) -> RunSummary:
    import ray

    run_dir = resolve_run_dir(cfg)
    out = RunDir(run_dir, active=True)
    out.write_config(cfg.to_dict())
    out.start_metrics(0)
    cfg_dict = cfg.to_dict()
    Shard = ray.remote(ParamShard).options(num_cpus=0, max_concurrency=max(64, 4 * n))
    Worker = ray.remote(PSWorker).options(num_cpus=0, scheduling_strategy="SPREAD", max_restarts=0)
    shards = [Shard.remote(cfg_dict, k, cfg.ps.shards, n) for k in range(cfg.ps.shards)]
    workers = {w: Worker.remote(cfg_dict, w, n, shards) for w in range(n)}
    ray.get([a.ready.remote() for a in [*shards, *workers.values()]])   # all started before the clock runs

    stats, deaths, replaced, dropped = _supervise(cfg, n, workers, shards, Worker, cfg_dict)
    reports = ray.get([s.report.remote() for s in shards])
    versions = {r["version"] for r in reports}
    if len(versions) != 1:
        raise RuntimeError(f"async-ps: server shards disagree on the number of updates applied: {versions}")
    if cfg.checkpoint.save_final:
        model = build(cfg.model)
        state = {}
        for part in ray.get([s.state.remote() for s in shards]):
            state.update(part)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name])
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, run_dir / "final_model.pt")
    for a in [*shards, *workers.values()]:
        ray.kill(a)

    records = reports[0]["records"]
    t0 = min(r["t_first_pull"] for r in reports if r["t_first_pull"] is not None) if records else time.time()
    n_params = count_params(build(cfg.model))
    per_worker = [stats[w] for w in sorted(stats)]
    async_stats = AsyncStats(
        workers=n, samples_per_update=0.0, tokens_per_s_per_update_median=None, staleness_bound=cfg.ps.staleness,
        ps_shards=cfg.ps.shards, workers_replaced=replaced, workers_dropped=dropped, worker_deaths=deaths,
        acked_clocks={str(w): c for w, c in reports[0]["acked"].items()},
        bytes_pushed=sum(r["bytes_in"] for r in reports), bytes_pulled=sum(r["bytes_out"] for r in reports),
        worker_stats=per_worker, server_state_bytes_by_shard=[r["state_bytes"] for r in reports])
    # sync (staleness 0): each clock's N gradients are one update of a whole global batch
    async_stats.samples_per_update = cfg.global_batch if cfg.ps.staleness == 0 else cfg.global_batch / n
    run = WorkerRun(
        n_workers=n, records=records, t0=t0, samples_per_update=async_stats.samples_per_update,
        bytes_total=async_stats.bytes_pushed + async_stats.bytes_pulled, n_params=n_params,
        # server shards: params + AdamW state of their slice; workers: a full replica + its gradients
        model_state_bytes_per_rank=max([r["state_bytes"] for r in reports] + [s["state_bytes"] for s in per_worker]),
        predicted_model_state_bytes_per_rank=max(n_params * 12 // cfg.ps.shards, n_params * 8),
        predicted_formula="server shard (4+8)Ψ/S, worker 4Ψ + 4Ψ",
        peak_memory_bytes_per_rank=max((s["peak_memory_bytes"] for s in per_worker), default=None))
    return write_run(cfg, out, run, async_stats)


def _supervise(cfg: RunConfig, n: int, workers: dict, shards: list, Worker, cfg_dict: dict):
    """Wait on every worker's run(); replace (or drop) a worker actor that dies.
    Returns ({worker: its stats}, deaths, replaced, dropped)."""
    import ray
    from ray.exceptions import RayActorError

    running = {workers[w].run.remote(0, cfg.steps): w for w in range(n)}
    stats, replaced, dropped, deaths = {}, 0, 0, []
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        w = running.pop(ref)
        try:
            stats[w] = ray.get(ref)
        except RayActorError as died:
            acked = min(ray.get([s.acked_clock.remote(w) for s in shards]))
            deaths.append({"worker": w, "acked_clock": acked, "error": type(died).__name__})
            if cfg.ps.on_worker_death == "replace" and replaced >= 3 * n:   # a crash that repeats is a bug
                raise RuntimeError(f"async-ps: {len(deaths)} worker deaths, the last: {deaths[-3:]}") from died
            if cfg.ps.on_worker_death == "replace":
                workers[w] = Worker.remote(cfg_dict, w, n, shards, True)
                running[workers[w].run.remote(acked, cfg.steps)] = w
                replaced += 1
            else:
                ray.get([s.drop.remote(w) for s in shards])
                dropped += 1
    return stats, deaths, replaced, dropped
