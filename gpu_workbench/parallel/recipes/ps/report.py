"""metrics.jsonl and summary.json for the recipes that launch their own workers (async-ps, hogwild).

One metrics record per applied update, in the order the updates were applied. An async update carries
one worker's slice of a global batch (global_batch / N samples), so `loss` is that small slice's loss
and `loss_avg` the mean of the last N updates' losses, one global batch of samples, the figure that
`final_loss` and `time_to_target_s` use, comparable with a sync recipe's per-step loss.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.primitives.comm import comm_summary
from gpu_workbench.parallel.runtime.rundir import RunDir, median
from gpu_workbench.parallel.runtime.summary import AsyncStats, RunSummary


def histogram(values) -> dict[str, int]:
    """{value: count}, keys as strings (JSON), in increasing order."""
    return {str(k): v for k, v in sorted(collections.Counter(values).items())}


@dataclass
class WorkerRun:
    """What an asynchronous recipe measured, for its summary."""

    n_workers: int
    records: list[dict]          # one per applied update, in order: loss, lr, grad_norm, applied, t, ...
    t0: float                    # wall clock of the first update's start
    samples_per_update: float
    bytes_total: int
    n_params: int
    model_state_bytes_per_rank: int | None   # measured; None where nothing measured it
    predicted_model_state_bytes_per_rank: int
    predicted_formula: str
    peak_memory_bytes_per_rank: int | None


def _history(cfg: RunConfig, out: RunDir, run: WorkerRun) -> tuple[list[dict], float | None]:
    """The metrics records (logged every log_every) and the time to target_loss, if reached."""
    tokens_per_update = run.samples_per_update * cfg.model.seq_len
    window = max(1, round(cfg.global_batch / run.samples_per_update))
    history, recent, prev_t, time_to_target = [], collections.deque(maxlen=window), run.t0, None
    for i, r in enumerate(run.records):
        recent.append(r["loss"])
        dt = max(r["t"] - prev_t, 1e-9)
        prev_t = r["t"]
        m = {"step": i, "tokens": round((i + 1) * tokens_per_update),   # every worker's updates so far
             "loss": r["loss"], "loss_avg": sum(recent) / len(recent), "step_time_s": dt,
             "tokens_per_s": tokens_per_update / dt, "lr": r["lr"], "grad_norm": r["grad_norm"],
             "applied": r["applied"], "elapsed_s": r["t"] - run.t0,
             **{k: r[k] for k in ("worker", "clock", "staleness", "version_lag") if k in r}}
        history.append(m)
        if i % cfg.log_every == 0 or i == len(run.records) - 1:
            out.log(m)
        if time_to_target is None and cfg.target_loss and len(recent) == window and m["loss_avg"] <= cfg.target_loss:
            time_to_target = m["elapsed_s"]
    return history, time_to_target


def write_run(cfg: RunConfig, out: RunDir, run: WorkerRun, stats: AsyncStats) -> RunSummary:
    history, time_to_target = _history(cfg, out, run)
    records = run.records
    elapsed = history[-1]["elapsed_s"] if history else 0.0
    samples = round(len(records) * run.samples_per_update)
    stats.tokens_per_s_per_update_median = median([m["tokens_per_s"] for m in history])
    stats.staleness_histogram = histogram(r["staleness"] for r in records if "staleness" in r) or None
    stats.version_lag_histogram = histogram(r["version_lag"] for r in records if "version_lag" in r) or None
    summary = RunSummary(
        recipe=cfg.recipe, world_size=run.n_workers, dp=run.n_workers, steps=cfg.steps,
        final_loss=history[-1]["loss_avg"] if history else None,
        # all workers' tokens over the wall time (per-update tokens/s would count one worker's share)
        tokens_per_s=samples * cfg.model.seq_len / elapsed if elapsed > 0 else None,
        n_params=run.n_params, elapsed_s=elapsed, micro_batch=cfg.micro_batch, global_batch=cfg.global_batch,
        tokens_per_step=cfg.global_batch * cfg.model.seq_len,
        skipped_steps=sum(not r["applied"] for r in records), device="cpu", precision=cfg.precision,
        run_dir=str(out.path), parallel_dims=None, target_loss=cfg.target_loss or None,
        time_to_target_s=time_to_target, peak_memory_bytes_per_rank=run.peak_memory_bytes_per_rank,
        model_state_bytes_per_rank=run.model_state_bytes_per_rank,
        predicted_model_state_bytes_per_rank=run.predicted_model_state_bytes_per_rank,
        predicted_formula=run.predicted_formula,
        comm=comm_summary(run.bytes_total, len(records), samples, elapsed), async_sgd=stats)
    out.write_summary(summary)
    return summary
