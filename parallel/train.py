"""One training loop for every recipe.

    train(cfg) inside whatever process group the launcher set up (torchrun's env), or alone.

Order of setup, the same for every recipe:
  1. process group (gloo on CPU, nccl on GPU) and device      4. data
  2. validate cfg against the world size                       5. resume from the newest checkpoint
  3. model (same seed on every rank), then the recipe wraps it  6. loop: micro-batches -> step -> log
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import checkpoint, fault, hooks, memory
from parallel.config import RunConfig
from parallel.data import Dataset, micro_batches
from parallel.model import GPT, PEAK_BF16_FLOPS, count_params, flops_per_token
from parallel.recipes import RECIPES
from parallel.recipes.base import Context
from parallel.rundir import RunDir, median
from profiling import range as prange
from profiling import timeline
from profiling.session import ProfileSession


def exit_worker(code: int = 0) -> None:
    """End a torchrun worker process once its work is done, skipping interpreter teardown.

    At interpreter exit gloo's threads are torn down in no particular order and abort the process
    now and then ("terminate called without an active exception", exit -6), failing a finished job.
    After a barrier (no rank leaves while another still talks to it) the process ends at once.
    """
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init_distributed(cfg: RunConfig) -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but no CUDA device is visible")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if cfg.recipe != "single" and not dist.is_initialized():
        if world > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo", **fault.restart_safe_store())
        else:   # a one-process group, so DDP / DeepSpeed / FSDP also run alone
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Context(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _broadcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_run_dir(cfg: RunConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    name = cfg.name or f"{cfg.recipe}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(_broadcast(str(Path("runs") / name)))   # rank 0's clock names it for everyone


def _mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().double().cpu()
    if dist.is_initialized():
        x = x.to(torch.float64)
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


def _gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _mfu(flops_per_s: float | None, device: torch.device) -> float | None:
    """Model FLOPs utilisation against the GPU's dense bf16 peak (None on CPU or an unknown GPU)."""
    if device.type != "cuda" or not flops_per_s:
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)
    return flops_per_s / peak if peak else None


class _Progress:
    """A rich progress bar on rank 0 (none elsewhere, or with progress = false)."""

    def __init__(self, enabled: bool, total: int, start: int, label: str):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def update(self, info: str) -> None:
        if self.bar:
            self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def train_step(engine, dataset: Dataset, cfg: RunConfig, step: int, dp_rank: int, dp: int, device: torch.device,
               on_backward=None) -> tuple[torch.Tensor, float, float, bool]:
    """One optimizer step: this rank's micro-batches of global batch `step`, forward and backward
    each (loss / accum), then clip + update. Returns (sum of micro-batch losses, lr used, grad norm,
    applied)."""
    if hasattr(engine, "train_step"):   # pipeline: the schedule runs the replica's micro-batches itself
        return engine.train_step(dataset, step, dp_rank, dp, on_backward)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    mbs = micro_batches(cfg.global_batch, cfg.micro_batch, dp_rank, dp)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for j, indices in enumerate(mbs):
        with prange("data", mb=j):
            x, y = (t.to(device) for t in dataset.batch(step, indices))
        with prange("fwd", mb=j), autocast:
            loss = engine.forward(x, y)
        with prange("bwd", mb=j):
            engine.backward(loss, len(mbs), last=j == len(mbs) - 1)
        loss_sum += loss.detach().double().cpu()
        if on_backward is not None:
            on_backward(j, len(mbs))
    lr = engine.lr   # the rate this step uses; step() moves the schedule on
    with prange("optimizer", step=step):
        grad_norm, applied = engine.step()
    return loss_sum, lr, grad_norm, applied


def train(cfg: RunConfig, nproc: int | None = None) -> dict:
    if RECIPES[cfg.recipe].launcher != "torchrun":   # async-ps (Ray actors), hogwild (processes): own workers
        cfg.validate(world_size=nproc or 1)
        return RECIPES[cfg.recipe].run(cfg, nproc or 1)
    ctx = init_distributed(cfg)
    cfg.validate(world_size=ctx.world_size)
    dp = RECIPES[cfg.recipe].dp_degree(cfg, ctx.world_size)
    accum = cfg.accum_steps(dp)
    run_dir = resolve_run_dir(cfg)
    out = RunDir(run_dir, active=ctx.is_main)
    out.write_config(cfg.to_dict())

    torch.manual_seed(cfg.seed)               # identical initial weights on every rank
    model = GPT(cfg.model)
    n_params = count_params(model)
    engine = RECIPES[cfg.recipe].setup(model, cfg, ctx)
    dataset = Dataset(cfg)

    start = checkpoint.resume(engine, run_dir) if cfg.checkpoint.resume else 0
    history = out.start_metrics(start)
    tokens_per_step = cfg.global_batch * cfg.model.seq_len
    skipped, held = 0, None
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0
    time_to_target = next((m["elapsed_s"] for m in history if cfg.target_loss and m["loss"] <= cfg.target_loss),
                          None)
    memory.reset_peak(ctx.device)

    def on_backward(j: int, n: int) -> None:
        nonlocal held
        if j in (0, n - 1):   # after the first backward (ZeRO-1 still holds unreduced full grads) and the last
            held = memory.max_bytes(held, memory.held_bytes(engine.held_tensors()))

    measure_step = start + 1 if cfg.steps - start > 1 else start   # after one step Adam's state exists
    progress = _Progress(cfg.progress and ctx.is_main, cfg.steps, start, cfg.recipe)
    # Nsight capture range / torch.profiler / host timeline, as `wb profile` and --timeline ask
    session = ProfileSession.from_env(run_dir, ctx.rank, use_timeline=cfg.profiling.timeline)
    fault.arm(cfg)   # fault.collective_timeout_s for the loop's collectives (after a possibly slow setup)
    t_start = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            fault.before_step(cfg, ctx.rank, step, run_dir)   # injected kill/hang (once per run); heartbeat
            t0 = time.perf_counter()
            measure = step == measure_step
            session.begin_step(step)
            with prange("step", step=step):
                loss_sum, lr, grad_norm, applied = train_step(engine, dataset, cfg, step, ctx.rank % dp, dp,
                                                              ctx.device, on_backward=on_backward if measure else None)
            session.end_step(step)
            if cfg.straggler.rank == ctx.rank and cfg.straggler.factor > 1:   # a slow worker, F x its compute
                time.sleep((cfg.straggler.factor - 1) * (time.perf_counter() - t0))
            loss_value = _mean_over_ranks(loss_sum / accum)
            if not applied:
                skipped += 1
                if cfg.nan_policy == "stop":
                    raise FloatingPointError(f"step {step}: non-finite loss/gradient (loss={loss_value}, "
                                             f"grad_norm={grad_norm}); nan_policy = 'stop'")
            dt = time.perf_counter() - t0
            elapsed = elapsed_before + time.perf_counter() - t_start
            record = {"step": step, "loss": loss_value, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                      "lr": lr, "grad_norm": grad_norm, "applied": applied, "elapsed_s": elapsed}
            history.append(record)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                out.log(record)
            if time_to_target is None and cfg.target_loss and loss_value <= cfg.target_loss:
                time_to_target = elapsed
            progress.update(f"loss {loss_value:.4f}")
            done = step + 1
            if cfg.checkpoint.every and (done % cfg.checkpoint.every == 0 or done == cfg.steps):
                with prange("checkpoint", step=done):
                    checkpoint.save(engine, run_dir, done, cfg.checkpoint.keep, ctx.rank, cfg.checkpoint.keep_every)
            hooks.after_step(record, run_dir)   # e.g. ray.train.report, with the checkpoint just saved
    except Exception as error:   # a collective that timed out: name the ranks that never arrived
        if fault.is_timeout(error):
            raise fault.explain_timeout(error, cfg, ctx.rank, step) from error
        raise
    finally:
        progress.close()
        session.close()
    if cfg.profiling.timeline:   # every rank has written timeline/timeline-rank<R>.json: merge them
        if dist.is_initialized():
            dist.barrier()
        if ctx.is_main:
            timeline.merge(run_dir / "timeline", run_dir / "trace.json")

    if cfg.checkpoint.save_final:
        state = engine.full_state_dict()   # collective
        if ctx.is_main:
            torch.save(state, run_dir / "final_model.pt")
    held = held or memory.held_bytes(engine.held_tensors())
    peaks = _gather(memory.peak_memory_bytes(ctx.device))
    held_all = _gather(held)
    measured = [h["total"] for h in held_all]
    tokens_per_s = median([m["tokens_per_s"] for m in history])
    flops = flops_per_token(cfg.model, n_params)
    summary = {
        "recipe": cfg.recipe,
        "world_size": ctx.world_size,
        "dp": dp,
        "steps": cfg.steps,
        "final_loss": history[-1]["loss"] if history else None,
        "tokens_per_s": tokens_per_s,
        "model_flops_per_token": flops,
        "achieved_tflops_per_rank": tokens_per_s * flops / ctx.world_size / 1e12 if tokens_per_s else None,
        "mfu": _mfu(tokens_per_s * flops / ctx.world_size if tokens_per_s else None, ctx.device),
        "peak_memory_bytes_per_rank": max(peaks),
        "peak_memory_bytes_by_rank": peaks,
        "model_state_bytes_per_rank": max(measured),
        "model_state_bytes_by_rank": held_all,
        "predicted_model_state_bytes_per_rank": memory.predicted_model_state_bytes(
            n_params, cfg.recipe, dp, cfg.precision, cfg.zero_stage if cfg.recipe.startswith("zero") else None),
        "predicted_formula": memory.formula_text(cfg.recipe, cfg.precision,
                                                 cfg.zero_stage if cfg.recipe.startswith("zero") else None),
        "n_params": n_params,
        "target_loss": cfg.target_loss or None,
        "time_to_target_s": time_to_target,
        "elapsed_s": history[-1]["elapsed_s"] if history else 0.0,
        "micro_batch": cfg.micro_batch,
        "accum_steps": accum,
        "global_batch": cfg.global_batch,
        "tokens_per_step": tokens_per_step,
        "skipped_steps": skipped,
        "resumed_from_step": start,
        "device": str(ctx.device),
        "precision": cfg.precision,
        "run_dir": str(run_dir),
    }
    if hasattr(engine, "summary_fields"):   # pipeline: bubble measured / predicted, pipeline.json (collective)
        summary.update(engine.summary_fields(run_dir))
    if hasattr(engine, "comm_summary"):   # bytes communicated per update / per sample (ddp, local-sgd)
        summary.update(engine.comm_summary(cfg.steps - start, summary["elapsed_s"]))
    out.write_summary(summary)
    return summary
