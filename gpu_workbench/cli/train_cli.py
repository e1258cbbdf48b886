"""`wb train` and `wb data prepare`.

`wb train --recipe R --nproc N` validates the config here, then, for N > 1 (or --max-restarts K,
--log-dir D), checks the run directory once (parallel/loop/preflight.py) and re-runs itself under torchrun
as `cluster.torchrun` builds it (c10d on localhost:0, gloo on CPU / nccl on GPU; torch's agent through
cluster/agent.py, so a worker's user mistake is printed here, once);
inside torchrun (or for N = 1) it calls `parallel.train` in this process.
`torchrun ... -m gpu_workbench train ...` takes the same path. `--launcher ray` runs the same train(cfg)
in N Ray Train workers instead (`cluster.ray_train`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from gpu_workbench.cli.paths import output_dir
from gpu_workbench.parallel.runtime.errors import UserError

data_app = typer.Typer(no_args_is_help=True, help="Prepare training data.")


def _inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def train(
    overrides: list[str] = typer.Argument(None, help="config overrides: key=value or section.key=value"),
    recipe: str = typer.Option(None, "--recipe", help="single, ddp, zero1-3, fsdp, async-ps, hogwild, local-sgd, ..."),
    nproc_text: str = typer.Option("1", "--nproc", help="processes (data-parallel ranks) on this node; ray: "
                                   "MIN:MAX for an elastic job"),
    config: Path = typer.Option(None, "--config", help="TOML config (e.g. configs/tiny.toml)"),
    run_dir: Path = typer.Option(None, "--run-dir", help="run directory (default runs/<recipe>-<time>)"),
    deepspeed: Path = typer.Option(None, "--deepspeed", help="a DeepSpeed JSON config, used as-is (zero recipes)"),
    timeline: bool = typer.Option(False, "--timeline", help="write <run_dir>/trace.json (Perfetto) of every rank"),
    launcher: str = typer.Option("local", "--launcher", help="local (torchrun on this node) or ray (Ray Train)"),
    max_restarts: int = typer.Option(0, "--max-restarts", help="local: torchrun restarts the group K times"),
    log_dir: Path = typer.Option(None, "--log-dir", help="local: one stdout/stderr log file per rank under here"),
    gpus_per_worker: float = typer.Option(0, "--gpus-per-worker", help="ray: GPUs per Ray Train worker"),
    ray_address: str = typer.Option(None, "--ray-address", help="ray, async-ps: an existing Ray cluster (default: "
                                    "a local Ray)"),
    max_failures: int = typer.Option(0, "--max-failures", help="ray: restarts of the worker group after a failure"),
) -> None:
    """Train the model under a recipe; writes config.json, metrics.jsonl, summary.json, checkpoints/."""
    from gpu_workbench.parallel import recipes

    items = config_items(overrides, recipe, deepspeed, run_dir, timeline)
    cfg = load_config(config, items)
    nproc = _nproc(nproc_text, elastic_ok=launcher == "ray" and recipes.get(cfg.recipe).execution == "spmd")
    if recipes.get(cfg.recipe).execution != "spmd":   # async-ps (Ray actors), hogwild: own workers, from here
        if ray_address:
            cfg.set("ps.ray_address", ray_address)
        recipes.resolve(cfg, nproc)
        _run(cfg, nproc)
        return
    if launcher not in ("local", "ray"):
        raise UserError(f"--launcher must be 'local' or 'ray', got '{launcher}'")
    if launcher == "ray":
        _train_on_ray(cfg, nproc, gpus_per_worker, ray_address, max_failures)
    elif _inside_torchrun():
        _train_as_rank(cfg, nproc)
    else:
        _train_local(cfg, config, items, nproc, max_restarts, log_dir)


def _nproc(text: str, elastic_ok: bool) -> int | tuple[int, int]:
    """--nproc N, or (ray only) MIN:MAX: an elastic Ray Train job of MIN to MAX workers."""
    low, sep, high = text.partition(":")
    try:
        value = (int(low), int(high)) if sep else int(text)
    except ValueError:
        raise UserError(f"--nproc must be an integer N or MIN:MAX, got '{text}'") from None
    if sep and not elastic_ok:
        raise UserError(f"--nproc {text}: MIN:MAX (elastic) needs --launcher ray and a Ray Train "
                        "(spmd) recipe")
    if sep and not 1 <= value[0] <= value[1]:
        raise UserError(f"--nproc {text}: needs 1 <= MIN <= MAX")
    return value


def config_items(overrides, recipe, deepspeed, run_dir, timeline) -> list[str]:
    """The options that are config keys, as key=value overrides (after the user's own)."""
    items = list(overrides or [])
    for key, value in (("recipe", recipe), ("zero.config_file", deepspeed), ("run_dir", run_dir)):
        if value is not None:
            items.append(f"{key}={value}")
    if timeline:
        items.append("profiling.timeline=true")
    return items


def load_config(config: Path | None, items: list[str]):
    from gpu_workbench.parallel import RunConfig

    return RunConfig.from_toml(config, items)


def _train_on_ray(cfg, nproc: int | tuple[int, int], gpus_per_worker: float, address: str | None,
                  max_failures: int) -> None:
    from gpu_workbench.cluster.ray_train import RayJobFailed, train_on_ray

    try:
        summary = train_on_ray(cfg, nproc, gpus_per_worker=gpus_per_worker, address=address,
                               max_failures=max_failures)
    except RayJobFailed as failed:   # one line, as for every other job failure
        print(f"wb: error: {failed}", file=sys.stderr)
        raise typer.Exit(1) from None
    _print_summary(summary)


def _train_as_rank(cfg, nproc: int) -> None:
    """One rank of a torchrun job (ours, or the user's `torchrun ... -m gpu_workbench train`)."""
    from gpu_workbench.parallel.runtime.distributed import exit_worker

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc not in (1, world):
        raise UserError(f"--nproc {nproc} disagrees with torchrun's WORLD_SIZE {world}")
    _run(cfg)
    exit_worker(0)


def _train_local(cfg, config: Path | None, items: list[str], nproc: int, max_restarts: int,
                 log_dir: Path | None) -> None:
    """In this process (one rank), or N ranks under torchrun on this node."""
    from gpu_workbench.parallel import recipes
    from gpu_workbench.parallel.runtime.rundir import resolve_run_dir

    recipes.resolve(cfg, nproc)            # config mistakes stop here, before any process starts
    if nproc == 1 and max_restarts == 0 and log_dir is None:
        _run(cfg)
        return
    if log_dir is not None:
        output_dir(log_dir, "--log-dir")
    run_dir = resolve_run_dir(cfg)
    if not cfg.run_dir:   # one directory for all ranks, chosen before they start
        items = [*items, f"run_dir={run_dir}"]
    from gpu_workbench.cluster import torchrun
    from gpu_workbench.parallel.loop.preflight import preflight
    from gpu_workbench.parallel.runtime.lock import RunLock

    # no --nproc in the workers' command: torchrun's parser would take it as its own
    worker = ["wb", "train", *([f"--config={config}"] if config is not None else []), *items]
    command = torchrun.torchrun_command(worker, nproc_per_node=nproc, max_restarts=max_restarts,
                                        log_dir=str(log_dir or ""), agent="gpu_workbench.cluster.agent")
    with RunLock(run_dir) as lock:   # held by this launcher; its ranks (and their restarts) write under it
        preflight(cfg, nproc)        # a resume that does not fit: one line here, not one per rank
        code = _run_workers(command, lock.token)
    if code:
        raise typer.Exit(code)


def _run_workers(command: list[str], lock_token: str) -> int:
    """torchrun's exit code; a worker's user mistake is printed here, once (parallel/runtime/worker_errors.py)."""
    import tempfile

    from gpu_workbench.cluster import torchrun
    from gpu_workbench.parallel.runtime import worker_errors
    from gpu_workbench.parallel.runtime.lock import TOKEN_ENV

    with tempfile.TemporaryDirectory(prefix="wb-errors-") as folder:
        os.environ.update({TOKEN_ENV: lock_token, worker_errors.ENV: folder})
        try:
            code = torchrun.run(command)
        finally:
            os.environ.pop(TOKEN_ENV, None)
            os.environ.pop(worker_errors.ENV, None)
        line = worker_errors.first(folder) if code else None
    if line is not None:
        raise UserError(line)
    return code


def _run(cfg, nproc: int | None = None) -> None:
    from gpu_workbench.parallel import train as run_train
    from gpu_workbench.parallel.runtime.faults import RankLost

    try:
        summary = run_train(cfg, nproc)
    except (FloatingPointError, TimeoutError, RankLost) as stop:   # divergence, a timeout, a lost peer: one line
        print(f"wb: error: {stop}", file=sys.stderr)
        raise typer.Exit(1) from None
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)


def _print_summary(summary) -> None:
    """One line from a RunSummary; a figure that was not measured prints as n/a."""
    state = summary.model_state_bytes_per_rank
    state_text = f"{state / 2**20:.2f} MiB/rank" if state is not None else "n/a"
    tokens = f"{summary.tokens_per_s:.0f}" if summary.tokens_per_s is not None else "n/a"
    loss = f"{summary.final_loss:.4f}" if summary.final_loss is not None else "n/a"
    print(f"{summary.layout()}: {summary.steps} steps, final loss {loss}, {tokens} tokens/s, "
          f"model state {state_text} -> {summary.run_dir}")


@data_app.command("prepare")
def prepare(
    text_file: Path = typer.Argument(..., help="any file; its bytes become tokens (vocab 256)"),
    out: Path = typer.Option(..., "--out", help="output token file, e.g. data.bin"),
) -> None:
    """Write a byte-level token file for data.kind = "bytes" (read back with numpy.memmap)."""
    from gpu_workbench.parallel.data import prepare_bytes

    n = prepare_bytes(text_file, out)
    print(f"wrote {n} tokens to {out}")
