"""metrics.jsonl and summary.json for the recipes that launch their own workers (async-ps, hogwild).

One metrics record per applied update, in the order the updates were applied. An async update carries
one worker's slice of a global batch (global_batch / N samples), so `loss` is that small slice's loss
and `loss_avg` the mean of the last N updates' losses, one global batch of samples, the figure that
`final_loss` and `time_to_target_s` use, comparable with a sync recipe's per-step loss.
"""

from __future__ import annotations

import collections
from pathlib import Path

from parallel.comm import comm_summary
from parallel.config import RunConfig
from parallel.rundir import RunDir, median


def resolve_run_dir(cfg: RunConfig) -> Path:
    from datetime import datetime

    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path("runs") / (cfg.name or f"{cfg.recipe}-{datetime.now():%Y%m%d-%H%M%S}")


def histogram(values) -> dict[str, int]:
    """{value: count}, keys as strings (JSON), in increasing order."""
    return {str(k): v for k, v in sorted(collections.Counter(values).items())}


def write_run(cfg: RunConfig, out: RunDir, n_workers: int, records: list[dict], t0: float,
              samples_per_update: float, bytes_total: int, extra: dict) -> dict:
    tokens_per_update = samples_per_update * cfg.model.seq_len
    window = max(1, round(cfg.global_batch / samples_per_update))
    history, recent, prev_t = [], collections.deque(maxlen=window), t0
    time_to_target = None
    for i, r in enumerate(records):
        recent.append(r["loss"])
        dt = max(r["t"] - prev_t, 1e-9)
        prev_t = r["t"]
        m = {"step": i, "loss": r["loss"], "loss_avg": sum(recent) / len(recent), "step_time_s": dt,
             "tokens_per_s": tokens_per_update / dt, "lr": r["lr"], "grad_norm": r["grad_norm"],
             "applied": r["applied"], "elapsed_s": r["t"] - t0,
             **{k: r[k] for k in ("worker", "clock", "staleness", "version_lag") if k in r}}
        history.append(m)
        if i % cfg.log_every == 0 or i == len(records) - 1:
            out.log(m)
        if time_to_target is None and cfg.target_loss and len(recent) == window and m["loss_avg"] <= cfg.target_loss:
            time_to_target = m["elapsed_s"]
    elapsed = history[-1]["elapsed_s"] if history else 0.0
    updates = len(records)
    samples = round(updates * samples_per_update)
    summary = {
        "recipe": cfg.recipe,
        "world_size": n_workers,
        "dp": n_workers,
        "steps": cfg.steps,
        "final_loss": history[-1]["loss_avg"] if history else None,
        # all workers' tokens over the wall time (per-update tokens/s would count one worker's share)
        "tokens_per_s": samples * cfg.model.seq_len / elapsed if elapsed > 0 else None,
        "tokens_per_s_per_update_median": median([m["tokens_per_s"] for m in history]),
        "n_params": extra.pop("n_params"),
        "target_loss": cfg.target_loss or None,
        "time_to_target_s": time_to_target,
        "elapsed_s": elapsed,
        "micro_batch": cfg.micro_batch,
        "global_batch": cfg.global_batch,
        "samples_per_update": samples_per_update,
        "tokens_per_step": cfg.global_batch * cfg.model.seq_len,
        "skipped_steps": sum(not r["applied"] for r in records),
        "staleness_bound": cfg.ps.staleness if cfg.recipe == "async-ps" else None,
        # SSP staleness: clocks ahead of the slowest worker when the gradient's parameters were read
        "staleness_histogram": histogram(r["staleness"] for r in records if "staleness" in r) or None,
        # server updates applied between that read and this gradient's apply
        "version_lag_histogram": histogram(r["version_lag"] for r in records if "version_lag" in r) or None,
        "device": "cpu",
        "precision": cfg.precision,
        "run_dir": str(out.path),
        **comm_summary(bytes_total, updates, samples, elapsed),
        **extra,
    }
    out.write_summary(summary)
    return summary
