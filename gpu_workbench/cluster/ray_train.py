"""`wb train --launcher ray`: the same `parallel.train(cfg)` in N Ray Train workers (TorchTrainer).

    summary = train_on_ray(cfg, nproc=2)                                  # an embedded local Ray
    summary = train_on_ray(cfg, nproc=16, gpus_per_worker=1, address="auto", max_failures=3)
    summary = train_on_ray(cfg, nproc=(2, 8), address="auto", max_failures=3)   # elastic: 2 to 8 workers

Elastic (MIN, MAX): Ray Train v2's ScalingConfig(num_workers=(MIN, MAX)) starts as many workers as the
cluster has room for; after a lost worker the group restarts at the size that fits (>= MIN), and the loop
resumes the newest checkpoint resharded with the same global batch (docs/ARCHITECTURE.md, Adding a
launcher). A restart first asks for the lost node's slot until Ray's worker-group start timeout
(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s) while the node is not yet marked dead.

Ray Train sets up the process group (gloo on CPU, nccl with GPUs) and the RANK/LOCAL_RANK/WORLD_SIZE
environment before `train(cfg)` runs, so the train loop is the torchrun one, unchanged.

Checkpoints. The run directory's own checkpoints (`<run_dir>/checkpoints/step_N`, written by every
rank, checked against their manifest on resume) are the source of truth, exactly as under torchrun:
sharded recipes write one part per rank into the same directory, so a multi-node run needs the run
directory on shared storage either way. Each time one lands, rank 0 also hands it to
`ray.train.report(metrics, checkpoint=...)`, so Ray Train keeps a persisted copy under
`<run_dir>/ray/` (or the storage path given) and knows the latest. After a lost worker,
`FailureConfig(max_failures)` restarts the whole group; each worker then asks
`ray.train.get_checkpoint()` and, if the run directory lacks that checkpoint (a node that did not
see it), restores Ray's copy into it; `train(cfg)` resumes from the newest good checkpoint. Ray is handed
the newest complete checkpoint once, at the first report after it lands (an async save lands after later
steps). An incremental delta's copy is not self-contained: it restores only where the folders it reads
from are in the run directory (else resume skips it as damaged, naming the missing folder). Every
worker calls `ray.train.report` once per optimizer step (only rank 0 attaches a checkpoint), which
is what Ray Train requires.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

from gpu_workbench.parallel.checkpoint import handed
from gpu_workbench.parallel.config import FAULT_WORLD_ENV
from gpu_workbench.parallel.loop.preflight import preflight
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.local_ray import start_local_ray
from gpu_workbench.parallel.runtime.lock import TOKEN_ENV, RunLock
from gpu_workbench.parallel.runtime.rundir import resolve_run_dir
from gpu_workbench.parallel.runtime.summary import RunSummary


class RayJobFailed(RuntimeError):
    """The Ray Train run failed (after its allowed restarts)."""


def _absolute_paths(cfg) -> None:
    """Workers may start in another directory: every path in the config becomes absolute."""
    cfg.run_dir = str(resolve_run_dir(cfg).resolve())
    if cfg.data.path:
        cfg.data.path = str(Path(cfg.data.path).resolve())
    if cfg.zero.config_file:
        cfg.zero.config_file = str(Path(cfg.zero.config_file).resolve())


def _restore_from_ray(run_dir: Path, rank: int, trusted: tuple) -> None:
    """Copy Ray's latest reported checkpoint into the run directory if that step is not there."""
    import ray.train

    from gpu_workbench.parallel import checkpoint

    reported = ray.train.get_checkpoint()
    if reported is None:
        return
    with reported.as_directory() as src:
        step = json.loads((Path(src) / "meta.json").read_text())["step"]
        final = run_dir / "checkpoints" / f"step_{step:06d}"
        if final.is_dir() and checkpoint.verify(final, trusted) is None:
            return   # shared storage: already here
        tmp = final.with_name(f"{final.name}.restore-{rank}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(final, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:   # another worker on this storage restored it first
            shutil.rmtree(tmp, ignore_errors=True)


def _newest_complete(run_dir: Path) -> Path | None:
    from gpu_workbench.parallel.checkpoint import complete_checkpoints

    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def _worker(config: dict) -> None:
    """The Ray Train loop function: runs on every worker."""
    import ray.train
    from ray.train import Checkpoint

    from gpu_workbench.parallel import RunConfig, recipes, train
    from gpu_workbench.parallel.loop import hooks

    cfg = RunConfig.from_dict(config["cfg"])
    if config.get("lock_token"):   # the driver's run lock: this job's ranks write under it
        os.environ[TOKEN_ENV] = config["lock_token"]
    os.environ[FAULT_WORLD_ENV] = str(config["max_workers"])   # a shrunk elastic job's faults aim at MAX
    if config.get("plan"):   # the driver's start decision: rank 0 takes it while the checkpoints are unchanged
        os.environ[handed.ENV] = config["plan"]
    rank = ray.train.get_context().get_world_rank()
    run_dir = Path(cfg.run_dir)
    _restore_from_ray(run_dir, rank, recipes.get(cfg.recipe).checkpoint_globals())

    reported = [_newest_complete(run_dir)]   # what Ray holds already (a resume's own checkpoint)

    def report(record: dict, run_dir: Path) -> None:
        # the newest complete checkpoint, once: an async save lands some steps after its own step
        newest = _newest_complete(run_dir) if rank == 0 else None
        ckpt = Checkpoint.from_directory(str(newest)) if newest is not None and newest != reported[0] else None
        reported[0] = newest if ckpt is not None else reported[0]
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float, bool))}
        metrics["world_size"] = ray.train.get_context().get_world_size()   # an elastic job's, as it ran
        ray.train.report(metrics, checkpoint=ckpt)

    with hooks.on_step(report):
        train(cfg)


# logger -> the lowest level still shown, in every Ray worker process. Ray Train logs each report of
# each rank at INFO ("Reporting training result N: TrainingReport(...)"), and its placement-group watcher
# warns that the State API is unavailable every few seconds when the cluster has no dashboard (our
# embedded Ray); neither says anything about the run.
QUIET_RAY_LOGGERS = {"ray.train.v2._internal.execution.context": logging.WARNING,
                     "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR}


class _AtLeast(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def quiet_ray_train_logs() -> None:
    """Ray's worker_process_setup_hook. Filters rather than levels (Ray Train sets its loggers' levels after
    this hook runs), on the module's logger under either name Ray uses (`__name__`, or `__file__`)."""
    import importlib.util

    for module, level in QUIET_RAY_LOGGERS.items():
        spec = importlib.util.find_spec(module)
        for name in {module, spec.origin if spec else module}:
            logging.getLogger(name).addFilter(_AtLeast(level))


def setup_ray_worker() -> None:
    """Ray's worker_process_setup_hook, run in every worker process before Ray Train's process group: gloo
    binds to the interface carrying this node's Ray address (cluster/netif.py; per node, as each node's
    address differs), and Ray Train's chatter is filtered unless WB_DEBUG reached the workers."""
    import ray

    from gpu_workbench.cluster import netif

    netif.pin_gloo_interface(ray.util.get_node_ip_address())
    if not os.environ.get("WB_DEBUG"):
        quiet_ray_train_logs()


def _quiet_logging_config(ray):
    """Ray Train's LoggingConfig at WARNING (where this Ray has one, 2.50+), unless WB_DEBUG asks for all."""
    config = getattr(ray.train, "LoggingConfig", None)
    return None if config is None or os.environ.get("WB_DEBUG") else config(log_level="WARNING")


def _init_ray(address: str | None, nproc: int) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")   # set inside a `ray job submit` job
    root = str(Path(__file__).resolve().parents[2])      # workers import the project from here
    env_vars = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    if os.environ.get("WB_DEBUG"):
        env_vars["WB_DEBUG"] = os.environ["WB_DEBUG"]
    env = {"env_vars": env_vars, "worker_process_setup_hook": "gpu_workbench.cluster.ray_train.setup_ray_worker"}
    if not os.environ.get("WB_DEBUG"):   # Ray Train's per-step chatter, cut in every worker process
        print("wb: Ray Train's per-step report lines and its state-API warnings are hidden (WB_DEBUG=1 shows "
              "them)", file=sys.stderr)
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        start_local_ray(max(nproc, os.cpu_count() or 1), runtime_env=env)


def _world_sizes(nproc: int | tuple[int, int]) -> range:
    """Every world size the job may run at: N, or MIN..MAX for an elastic job."""
    low, high = nproc if isinstance(nproc, tuple) else (nproc, nproc)
    if not 1 <= low <= high:
        raise UserError(f"--nproc must be >= 1 (MIN:MAX with MIN <= MAX), got {nproc}")
    return range(low, high + 1)


def check_elastic_support(nproc: int | tuple[int, int]) -> None:
    """MIN:MAX needs Ray Train v2's elastic ScalingConfig (a (min, max) num_workers, Ray 2.5x+); any run on
    Ray needs Ray installed (the GPU image has none): a user's mistake, one line."""
    try:
        import ray.train
    except ImportError:
        raise UserError("--launcher ray needs Ray, which is not installed here: pip install 'ray[default,train]'"
                        ) from None

    if isinstance(nproc, tuple) and not hasattr(ray.train.ScalingConfig, "elastic_resize_monitor_interval_s"):
        raise UserError(f"--nproc {nproc[0]}:{nproc[1]}: this Ray ({ray.__version__}) has no elastic Ray Train "
                        "(ScalingConfig num_workers=(MIN, MAX), Train v2); give --nproc N")


def train_on_ray(cfg, nproc: int | tuple[int, int], gpus_per_worker: float = 0, address: str | None = None,
                 max_failures: int = 0, storage_path: str | None = None) -> RunSummary:
    """Run `train(cfg)` on `nproc` Ray Train workers, or (MIN, MAX) for an elastic job; returns the summary
    (summary.json of the run)."""
    sizes = _world_sizes(nproc)
    if gpus_per_worker < 0 or max_failures < 0:
        raise UserError(f"--gpus-per-worker and --max-failures must be >= 0, got {gpus_per_worker} and "
                         f"{max_failures}")
    from gpu_workbench.parallel import recipes

    os.environ[FAULT_WORLD_ENV] = str(sizes[-1])   # injected faults aim at MAX workers (here and in workers)
    try:
        for world_size in sizes:   # an elastic job may run at any of them: every layout must be valid
            recipes.resolve(cfg, world_size)
    finally:
        os.environ.pop(FAULT_WORLD_ENV)
    check_elastic_support(nproc)
    _absolute_paths(cfg)
    run_dir = Path(cfg.run_dir)
    with RunLock(run_dir) as lock:   # one writer per run directory, the driver for its workers
        os.environ[FAULT_WORLD_ENV] = str(sizes[-1])
        try:   # a resume that does not fit: one line, before Ray starts; elastic: it must fit every size
            begin = preflight(cfg, sizes if isinstance(nproc, tuple) else nproc)
        finally:
            os.environ.pop(FAULT_WORLD_ENV)
        _init_ray(address, sizes[-1])
        return _fit(cfg, nproc, run_dir, gpus_per_worker, max_failures, storage_path, lock.token,
                    handed.encode(begin, run_dir))   # checkpoints verified here, once


def _fit(cfg, nproc: int | tuple[int, int], run_dir: Path, gpus_per_worker: float, max_failures: int,
         storage_path: str | None, lock_token: str, plan: str = "") -> RunSummary:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = gpus_per_worker > 0
    resources = {"CPU": 1, **({"GPU": gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.to_dict(), "lock_token": lock_token, "max_workers": _world_sizes(nproc)[-1],
                           "plan": plan},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=nproc, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_dir.name, storage_path=str(Path(storage_path or run_dir / "ray").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            **({"logging_config": quiet} if (quiet := _quiet_logging_config(ray)) else {})),
    )
    try:
        result = trainer.fit()
    except Exception as error:   # noqa: BLE001 - Ray wraps the workers' errors; one line for the user
        raise RayJobFailed(f"Ray Train run failed (max_failures={max_failures}): "
                           f"{str(error).strip().splitlines()[-1] if str(error).strip() else error!r}") from error
    if getattr(result, "error", None):
        raise RayJobFailed(f"Ray Train run failed (max_failures={max_failures}): {result.error}")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return RunSummary.load(summary_path)
    return _summary_from_report(cfg, result.metrics or {})


def _summary_from_report(cfg, m: dict) -> RunSummary:
    """The run dir is on another node: what the last step's report carries (the world size it really ran
    at, which an elastic job chooses); the rest was not measured here."""
    from gpu_workbench.parallel.models.transformer import build, count_params

    world = int(m["world_size"])
    return RunSummary(
        recipe=cfg.recipe, world_size=world, dp=world, steps=cfg.steps, final_loss=m.get("loss"),
        tokens_per_s=m.get("tokens_per_s"), n_params=count_params(build(cfg.model)), elapsed_s=m.get("elapsed_s", 0.0),
        micro_batch=cfg.micro_batch, global_batch=cfg.global_batch,
        tokens_per_step=cfg.global_batch * cfg.model.seq_len, skipped_steps=None, device="unknown",
        precision=cfg.precision, run_dir=cfg.run_dir)
