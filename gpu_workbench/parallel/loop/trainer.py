"""One training loop for every recipe that runs in a process per rank, in three parts.

    summary = train(cfg)    # inside whatever process group the launcher set up (torchrun's env), or alone

  1. setup      process group and device; every check (parallel.recipes.resolve); run directory; model
                (same seed on every rank), which the recipe wraps into an engine; data; resume
  2. run_steps  for each step: injected faults -> micro-batches (engine.train_step) -> log -> evaluate
                -> checkpoint
  3. summarise  the typed RunSummary (parallel/runtime/summary.py), written to <run_dir>/summary.json

Recipes that start their own workers (async-ps, hogwild) run through `recipe.run` instead and write the
same summary. The data flow of one step is drawn in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gpu_workbench.parallel import checkpoint, models, recipes
from gpu_workbench.parallel.checkpoint import hf_files
from gpu_workbench.parallel.checkpoint import writer as checkpoint_writer
from gpu_workbench.parallel.checkpoint.start import decide, describe
from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.data import Dataset
from gpu_workbench.parallel.loop import afresh, hooks, rerun
from gpu_workbench.parallel.loop.progress import Progress
from gpu_workbench.parallel.models import qat
from gpu_workbench.parallel.models.transformer import PEAK_BF16_FLOPS, build, count_params
from gpu_workbench.parallel.recipes.base import freeze
from gpu_workbench.parallel.runtime import faults, memory, previous, provenance
from gpu_workbench.parallel.runtime import flight_recorder as flight
from gpu_workbench.parallel.runtime.distributed import broadcast, gather, init_distributed, mean_over_ranks
from gpu_workbench.parallel.runtime.injector import FaultInjector
from gpu_workbench.parallel.runtime.lock import RunLock
from gpu_workbench.parallel.runtime.rundir import RunDir, median, read_evals, resolve_run_dir
from gpu_workbench.parallel.runtime.summary import RunSummary
from gpu_workbench.profiling import range as prange
from gpu_workbench.profiling import timeline
from gpu_workbench.profiling.session import ProfileSession


def train(cfg: RunConfig, nproc: int | None = None) -> RunSummary:
    recipe = recipes.get(cfg.recipe)
    if recipe.execution != "spmd":   # async-ps (Ray actors), hogwild (processes): their own workers
        recipes.resolve(cfg, nproc or 1)
        cfg.run_dir = str(resolve_run_dir(cfg))
        with RunLock(Path(cfg.run_dir)):
            finished = afresh.prepare(Path(cfg.run_dir), cfg)   # no checkpoints: the old run moves aside
            return finished if finished is not None else recipe.run(cfg, nproc or 1)
    trainer = Trainer(cfg)
    try:
        if trainer.finished is not None:   # a finished run rerun with its settings: its summary, unchanged
            return trainer.finished
        trainer.run_steps()
        summary = trainer.summarise()
    except BaseException as error:   # what each rank's last collectives were (parallel/runtime/flight_recorder.py)
        flight.dump(f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")
        raise
    finally:
        flight.stop()
        trainer.close()
    if summary.final_loss is not None and not math.isfinite(summary.final_loss):
        raise FloatingPointError(f"the run ended with a non-finite loss ({summary.final_loss}) after "
                                 f"{summary.skipped_steps} skipped step(s): it diverged (see nan_policy)")
    return summary


class Trainer:
    def __init__(self, cfg: RunConfig):
        """Part 1, setup: everything before the first step. Nothing is written into the run directory
        until every check, the resume fingerprint's included, has passed."""
        self.cfg, self.recipe = cfg, recipes.get(cfg.recipe)
        self.ctx = ctx = init_distributed(cfg, self.recipe.needs_process_group)
        ctx.dims = self.dims = recipes.resolve(cfg, ctx.world_size)
        if cfg.profiling.timeline or cfg.fault.flight_records:   # collectives wrapped for the timeline and the
            from gpu_workbench.parallel.primitives import comm_spans  # flight recorder, before the engine keeps
                                                                      # references
            comm_spans.install()
        # a run_dir the launcher did not set is named by rank 0's clock, for every rank
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(broadcast(str(resolve_run_dir(cfg))))
        self.lock = RunLock(self.run_dir).acquire() if ctx.is_main else None   # one writer per run directory
        self.finished: RunSummary | None = None
        try:
            self._setup(cfg, ctx)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: RunConfig, ctx) -> None:
        begin = decide(self.run_dir, cfg, ctx.world_size, ctx.is_main, self.recipe.checkpoint_format,
                       self.recipe.checkpoint_globals())   # resume, checkpoint.load_from, or fresh
        if rerun.check(self.run_dir, cfg, begin, ctx.is_main):   # nothing to do; or metrics.jsonl refused
            self.finished = RunSummary.load(self.run_dir / "summary.json")
            return
        if cfg.precision == "bf16" and ctx.device.type == "cpu" and ctx.is_main:
            print("wb: warning: precision = 'bf16' on a CPU runs bf16 autocast, several times slower than fp32 "
                  "here (seen: 8x); use precision=fp32 on CPU", file=sys.stderr)
        torch.manual_seed(cfg.seed)               # identical initial weights on every rank
        model = build(cfg.model, init=not (begin.path or "").startswith("hf:"))   # hf: fills every weight
        self.n_params = count_params(model)
        self.qat = qat.apply(model, cfg)          # quant.qat: fake-quantised block layers (parallel/models/qat.py)
        freeze(model, cfg.optim.frozen)           # before setup: DDP/FSDP see which parameters train
        self.engine = self.recipe.setup(model, cfg, ctx)
        self.dataset = Dataset(cfg)
        self.start = checkpoint.load(self.engine, begin.path, begin.model_only) if begin.path else 0
        if ctx.is_main and not cfg.checkpoint.resume:   # a fresh start keeps the old run, moved aside
            moved = previous.move_aside(self.run_dir)
            if moved is not None:
                print(f"wb: checkpoint.resume=false: the previous run in {self.run_dir} moved to {moved}",
                      file=sys.stderr)
        self.out = RunDir(self.run_dir, active=ctx.is_main)
        if ctx.is_main and begin.path and begin.path.startswith("hf:"):   # its tokenizer, for sample and export
            hf_files.keep(Path(begin.path[3:]), self.run_dir)
        self.out.write_config(cfg.to_dict(), resumed_from_step=self.start if begin.how == "resume" else 0,
                              start=begin.record())
        note, line = faults.restart_note(self.run_dir), describe(begin, cfg, ctx.world_size, self.dims.degrees())
        if ctx.is_main and (line or note):
            print(f"wb: {note + '; ' if note else ''}{line}" if line
                  else f"wb: {note}; no checkpoint yet: starting over", file=sys.stderr)
        self.history = self.out.start_metrics(self.start)
        kept_evals = [m["val_loss"] for m in read_evals(self.run_dir) if m["step"] < self.start]
        self.val_loss = kept_evals[-1] if kept_evals else None   # the summary's until this segment evaluates
        self.faults = FaultInjector(cfg, ctx.rank, self.run_dir)
        skip = (cfg.fault.skip_collective_rank, cfg.fault.skip_collective_at_step)
        flight.start(self.run_dir, ctx.rank, ctx.world_size, cfg.fault.flight_records if ctx.world_size > 1 else 0,
                     skip if cfg.fault.skip_collective_at_step >= 0 else None,
                     write_through=cfg.fault.flight_write_through)
        self.skipped, self.skipped_in_a_row, self.rollbacks, self.held, self.overflows = 0, 0, 0, None, 0
        # the newest published checkpoint (what an incremental save builds on) and the bytes the run's saves
        # wrote up to it, carried over a resume by its meta.json; an async save waiting to be published
        self.last_ckpt = Path(begin.path) if begin.how == "resume" else None
        self.ckpt_bytes, self.ckpt_blocking_s = checkpoint.bytes_written_total(self.last_ckpt), 0.0
        self.pending = None
        self.elapsed_before = self.history[-1]["elapsed_s"] if self.history else 0.0
        self.time_to_target = next((m["elapsed_s"] for m in self.history if self._reached(m["loss"])), None)
        # held memory is measured during the second step run: after one step Adam's state exists
        self.measure_step = self.start + 1 if cfg.steps - self.start > 1 else self.start

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _reached(self, loss: float) -> bool:
        return bool(self.cfg.target_loss) and loss <= self.cfg.target_loss

    # ---- part 2: the steps ----------------------------------------------------------------
    def run_steps(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        memory.reset_peak(ctx.device)
        self.progress = progress = Progress(cfg.progress and ctx.is_main, cfg.steps, self.start, cfg.recipe)
        # Nsight capture range / torch.profiler / host timeline, as `wb profile` and --timeline ask
        session = ProfileSession.from_env(self.run_dir, ctx.rank, use_timeline=cfg.profiling.timeline)
        faults.arm(cfg)   # fault.collective_timeout_s for the loop's collectives (after a possibly slow setup)
        self.t_start = time.perf_counter()
        step = self.start
        try:
            while step < cfg.steps:
                session.begin_step(step)
                record = self._one_step(step)
                session.end_step(step)
                progress.update(f"loss {record['loss']:.4f}")
                step = self._next_step(record)
                if step == record["step"] + 1:   # moving on (not rolled back): checkpoint, report
                    self._after_step(record)
        except Exception as error:   # a collective that timed out or lost its peer: say so in one line
            if faults.is_timeout(error):
                raise faults.explain_timeout(error, cfg, ctx.rank, step) from error
            lost = faults.explain_peer_loss(error, ctx.rank, step)
            if lost is not None:
                raise lost from error
            raise
        finally:
            progress.close()
            session.close()
        began = time.perf_counter()
        self.finish_pending_save()   # the end of training waits for the last async save: blocking too
        self.ckpt_blocking_s += time.perf_counter() - began
        checkpoint_writer.close()
        if cfg.profiling.timeline:   # every rank has written timeline/timeline-rank<R>.json: merge them
            if dist.is_initialized():
                dist.barrier()
            if ctx.is_main:
                timeline.merge(self.run_dir / "timeline", self.run_dir / "trace.json")

    def _one_step(self, step: int) -> dict:
        cfg, ctx = self.cfg, self.ctx
        flight.set_step(step)
        self.faults.before_step(step)   # injected kill/hang (once per run)
        faults.heartbeat(ctx.rank, step)
        t0 = time.perf_counter()
        on_backward = self._measure_held if step == self.measure_step else None
        if self.faults.poisons(step):   # fault.nan_at_step: this rank's gradient turns NaN
            on_backward = functools.partial(self._poison_gradient, float("nan"))
        if self.faults.overflows(step):   # fault.overflow_at_step: an inf, which the fp16 loss scaler skips
            on_backward = functools.partial(self._poison_gradient, float("inf"))
        with prange("step", step=step):
            began = time.perf_counter()
            result = self.engine.train_step(self.dataset, step, self.dims.dp_rank(ctx.rank), self.dims.dp,
                                            on_backward=on_backward)
            compute_s = time.perf_counter() - began
            # a slow worker: F x this step's compute, step 0 included; the others wait for it in the loss
            # all-reduce below. (Before the step, the delay had to be a multiple of the previous step, none at
            # step 0, and at step 1 the others waited in DDP's bucket-rebuild broadcast, which no timeline sees.)
            self.faults.straggle(compute_s)
        loss = mean_over_ranks(result.loss_sum / cfg.accum_steps(self.dims.dp))
        dt = time.perf_counter() - t0
        elapsed = self.elapsed_before + time.perf_counter() - self.t_start
        tokens = (step + 1) * cfg.global_batch * cfg.model.seq_len   # seen by the end of this step
        record = {"step": step, "tokens": tokens, "loss": loss, "step_time_s": dt,
                  "tokens_per_s": cfg.global_batch * cfg.model.seq_len / dt, "lr": result.lr,
                  "grad_norm": result.grad_norm, "applied": result.applied, "elapsed_s": elapsed}
        if result.loss_scale is not None:   # precision=fp16: the scale after this step; a skip is an overflow
            record.update(loss_scale=result.loss_scale, overflow=not result.applied and math.isfinite(loss))
        self.history.append(record)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            self.out.log(record)
        if self.time_to_target is None and self._reached(loss):
            self.time_to_target = elapsed
        return record

    def _after_step(self, record: dict) -> None:
        cfg, done = self.cfg, record["step"] + 1
        if cfg.eval.every and (done % cfg.eval.every == 0 or done == cfg.steps):
            with prange("eval", step=done):
                self._evaluate(record)
        if cfg.checkpoint.every and (done % cfg.checkpoint.every == 0 or done == cfg.steps):
            with prange("checkpoint", step=done):
                began = time.perf_counter()
                self.finish_pending_save()   # the previous async save first: the next builds on it
                pending = checkpoint.begin_save(self.engine, self.run_dir, done, self.ctx.rank,
                                                self.recipe.checkpoint_format, self.last_ckpt, self.ckpt_bytes)
                if cfg.checkpoint.async_save:
                    self.pending = pending   # published when every rank's background write is done
                else:
                    self._published(pending.publish(cfg.checkpoint.keep, cfg.checkpoint.keep_every))
                self.ckpt_blocking_s += time.perf_counter() - began
        elif self.pending is not None and self.pending.finished_everywhere():
            self.finish_pending_save()
        hooks.after_step(record, self.run_dir)   # e.g. ray.train.report, with the checkpoint just saved

    def finish_pending_save(self) -> None:
        """Wait for an async save's background write and publish it (nothing pending: nothing). Collective."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._published(pending.publish(self.cfg.checkpoint.keep, self.cfg.checkpoint.keep_every))

    def _published(self, path: Path) -> None:
        self.last_ckpt = path
        if self.ctx.is_main:   # measured from its files when it was published (checkpoint.PendingSave)
            self.ckpt_bytes = checkpoint.bytes_written_total(path)

    def _evaluate(self, record: dict) -> None:
        """The held-out loss of the model after this step: eval.batches global batches of the validation
        split, each rank its data-parallel share, reduced as the training loss is. No gradients, no RNG
        draws: the training trajectory is the same with and without it."""
        cfg, dims = self.cfg, self.dims
        total = sum(self.engine.eval_loss(self.dataset, b, dims.dp_rank(self.ctx.rank), dims.dp)
                    for b in range(cfg.eval.batches))
        self.val_loss = mean_over_ranks(total / (cfg.accum_steps(dims.dp) * cfg.eval.batches))
        elapsed = self.elapsed_before + time.perf_counter() - self.t_start
        self.out.log({"step": record["step"], "tokens": record["tokens"], "val_loss": self.val_loss,
                      "elapsed_s": elapsed})
        if self.ctx.is_main:   # with progress=false too: an evaluation is rare and worth seeing
            self.progress.say(f"step {record['step'] + 1}/{cfg.steps}: val_loss {self.val_loss:.4f}")

    def _next_step(self, record: dict) -> int:
        """The step to run next, as the nan_policy says after a skipped (non-finite) step."""
        cfg, step = self.cfg, record["step"]
        if record["applied"]:
            self.skipped_in_a_row = 0
            return step + 1
        self.skipped += 1
        if record.get("overflow"):   # fp16: expected, the loss scaler has skipped it and halved its scale
            self.overflows += 1
            return step + 1
        self.skipped_in_a_row += 1
        why = f"step {step}: non-finite loss/gradient (loss={record['loss']}, grad_norm={record['grad_norm']})"
        if cfg.nan_policy == "stop":
            raise FloatingPointError(f"{why}; nan_policy = 'stop'")
        if cfg.nan_policy == "skip":
            if self.skipped_in_a_row >= cfg.nan_skip_limit:
                raise FloatingPointError(f"{why}: {self.skipped_in_a_row} steps in a row skipped "
                                         f"(nan_skip_limit = {cfg.nan_skip_limit}); the run has diverged")
            return step + 1
        return self._roll_back(why)

    def _roll_back(self, why: str) -> int:
        """nan_policy = 'rollback': reload the newest good checkpoint, lower the learning rate, go on."""
        cfg = self.cfg
        if self.rollbacks >= 3:
            raise FloatingPointError(f"{why}: still diverging after 3 rollbacks")
        self.finish_pending_save()
        path = checkpoint.find_resumable(self.run_dir, cfg, self.ctx.world_size, self.ctx.is_main,
                                         self.recipe.checkpoint_format, self.recipe.checkpoint_globals())
        if path is None:
            raise FloatingPointError(f"{why}: nan_policy = 'rollback' found no checkpoint to roll back to")
        back_to = checkpoint.load(self.engine, path)
        self.engine.scale_lr(cfg.nan_rollback_lr_factor ** (self.rollbacks + 1))
        self.rollbacks += 1
        self.skipped_in_a_row = 0
        self.history = self.out.start_metrics(back_to)   # the steps after the checkpoint are run again
        if self.ctx.is_main:
            print(f"wb: {why}; rolled back to step {back_to} ({path}), learning rate x "
                  f"{cfg.nan_rollback_lr_factor ** self.rollbacks:g} (rollback {self.rollbacks} of 3)",
                  file=sys.stderr)
        return back_to

    def _poison_gradient(self, value: float, j: int, n: int) -> None:
        if j == n - 1:   # after the last backward, on every rank, so every rank skips the same step
            grads = self.engine.held_tensors()["grads"]
            if grads:
                grads[0].view(-1)[0] = value

    def _measure_held(self, j: int, n: int) -> None:
        if j in (0, n - 1):   # after the first backward (ZeRO-1 still holds unreduced full grads) and the last
            self.held = memory.max_bytes(self.held, memory.held_bytes(self.engine.held_tensors()))

    # ---- part 3: the summary --------------------------------------------------------------
    def summarise(self) -> RunSummary:
        cfg, ctx, history = self.cfg, self.ctx, self.history
        if cfg.checkpoint.save_final:
            state = self.engine.full_state_dict()   # collective
            if ctx.is_main:
                torch.save(state, self.run_dir / "final_model.pt")
        held_all = gather(self.held or memory.held_bytes(self.engine.held_tensors()))
        peaks = gather(memory.peak_memory_bytes(ctx.device))
        counted = max(gather(self.engine.params_on_rank(self.n_params)))
        model = self.recipe.memory_model(cfg)
        tokens_per_s = median([m["tokens_per_s"] for m in history])
        flops = models.get(cfg.model.arch).flops_per_token(cfg.model)
        per_rank = tokens_per_s * flops / ctx.world_size if tokens_per_s else None
        elapsed = history[-1]["elapsed_s"] if history else 0.0
        summary = RunSummary(
            recipe=cfg.recipe, world_size=ctx.world_size, dp=self.dims.dp, parallel_dims=self.dims.degrees(),
            steps=cfg.steps, final_loss=history[-1]["loss"] if history else None, tokens_per_s=tokens_per_s,
            model_flops_per_token=flops, achieved_tflops_per_rank=per_rank / 1e12 if per_rank else None,
            mfu=_mfu(per_rank, ctx.device), peak_memory_bytes_per_rank=max(peaks), peak_memory_bytes_by_rank=peaks,
            model_state_bytes_per_rank=max(h["total"] for h in held_all), model_state_bytes_by_rank=held_all,
            predicted_model_state_bytes_per_rank=model.predicted_bytes(counted, self.dims.dp),
            predicted_formula=model.formula, n_params=self.n_params, target_loss=cfg.target_loss or None,
            time_to_target_s=self.time_to_target, final_val_loss=self.val_loss, elapsed_s=elapsed,
            micro_batch=cfg.micro_batch,
            accum_steps=cfg.accum_steps(self.dims.dp), global_batch=cfg.global_batch,
            tokens_per_step=cfg.global_batch * cfg.model.seq_len, skipped_steps=self.skipped,
            resumed_from_step=self.start, rollbacks=self.rollbacks, device=str(ctx.device), precision=cfg.precision,
            run_dir=str(self.run_dir), checkpoint_bytes_written=self.ckpt_bytes,
            checkpoint_blocking_s=max(gather(self.ckpt_blocking_s)), qat=self.qat, compiled=cfg.train.compile,
            compile_s=_compile_s(history, self.start) if cfg.train.compile else None,
            activation_checkpointing=cfg.model.activation_checkpointing,
            activation_bytes_saved=self.engine.activation_bytes, overflow_steps=self.overflows,
            loss_scale=history[-1].get("loss_scale") if history else None,
            **self.engine.summary_parts(self.run_dir, cfg.steps - self.start, elapsed))
        self.out.write_summary(summary, provenance.device_name(ctx.device))
        return summary


def _compile_s(history: list[dict], start: int) -> float | None:
    """The first step's extra time over the median step (what compiling, and the first step's warm-up, cost):
    this segment's first step against its others; None with fewer than two steps."""
    times = [m["step_time_s"] for m in history if m["step"] >= start]
    return max(0.0, times[0] - median(times[1:])) if len(times) > 1 else None


def _mfu(flops_per_s: float | None, device: torch.device) -> float | None:
    """Model FLOPs utilisation against the GPU's dense bf16 peak (None on CPU or an unknown GPU)."""
    if device.type != "cuda" or not flops_per_s:
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)
    return flops_per_s / peak if peak else None
