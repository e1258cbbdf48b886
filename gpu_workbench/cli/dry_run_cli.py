"""`wb train --dry-run --nproc N ... [--json F]`: the layout laid out on N fake ranks in this process
(parallel/tools/dry_run.py); prints per rank what it holds and one step's collectives, and writes them as JSON
with the keys the real run's summary.json uses (model_state_bytes_by_rank, comm.bytes_per_update,
tp.tp_bytes_per_step_per_rank_measured)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gpu_workbench.cli.paths import output_file


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def to_json(result) -> dict:
    """The dry run as summary.json's keys (what the real run measures), per rank, plus what it adds."""
    peak = [s["total"] + e["activations"] for s, e in zip(result.by_rank, result.extra, strict=True)]
    first = result.collectives[0]
    return {
        "dry_run": True, "recipe": result.cfg.recipe, "world_size": result.dims.world_size, "dp": result.dims.dp,
        "parallel_dims": result.dims.degrees(), "n_params": result.n_params, "micro_batch": result.cfg.micro_batch,
        "global_batch": result.cfg.global_batch, "precision": result.cfg.precision,
        "model_state_bytes_per_rank": max(s["total"] for s in result.by_rank),
        "model_state_bytes_by_rank": result.by_rank,
        "activation_bytes_by_rank": [e["activations"] for e in result.extra],
        "estimated_peak_bytes_by_rank": peak,
        "checkpoint_bytes_by_rank": [e["checkpoint_bytes"] for e in result.extra],
        "comm": first["comm"], "tp": first["tp"],
        "collectives_by_rank": [c["ops"] for c in result.collectives],
        "ranks_laid_out": result.laid_out, "uneven_stages": result.uneven_stages, "elapsed_s": result.elapsed_s,
    }


def print_report(result, out) -> None:
    """Per distinct rank (ranks holding the same are one line), then rank 0's collectives of one step."""
    data = to_json(result)
    print(f"dry run: {result.cfg.recipe} x{result.dims.world_size} "
          f"({' x '.join(f'{k} {v}' for k, v in result.dims.degrees().items() if v > 1) or 'one rank'}), "
          f"{_count(result.n_params)} parameters, {len(result.laid_out)} rank(s) laid out in "
          f"{result.elapsed_s:.1f} s", file=out)
    rows: dict[tuple, list[int]] = {}
    for r, (s, act) in enumerate(zip(result.by_rank, data["activation_bytes_by_rank"], strict=True)):
        rows.setdefault((s["params"], s["grads"], s["optimizer"], act), []).append(r)
    print(f"{'ranks':>14}  {'params':>11}  {'grads':>11}  {'optimizer':>11}  {'activations':>11}  {'total':>11}",
          file=out)
    for (p, g, o, a), ranks in rows.items():
        name = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"
        print(f"{name:>14}  {_gib(p):>11}  {_gib(g):>11}  {_gib(o):>11}  {_gib(a):>11}  {_gib(p + g + o + a):>11}",
              file=out)
    print("one step's collectives on rank 0:", file=out)
    rows_ops: dict[tuple, list[dict]] = {}   # the same collective of many FSDP units: one line
    for op in result.collectives[0]["ops"]:
        key = (op["op"], op["group"], op["group_size"], op["count"], op["bytes"], re.sub(r"\d+", "N", op["what"]))
        rows_ops.setdefault(key, []).append(op)
    for (kind, group, size, count, nbytes, what), ops in rows_ops.items():
        label = ops[0]["what"] if len(ops) == 1 else f"{what.replace('N', '*')}, {len(ops)} of them"
        print(f"  {kind:<15} over {group} ({size}) x{count}: {_gib(nbytes)} each  [{label}]", file=out)


def run(cfg, nproc: int, json_path: Path | None) -> None:
    import sys

    from gpu_workbench.parallel.tools.dry_run import dry_run

    if json_path is not None:
        output_file(json_path, "--json")
    result = dry_run(cfg, nproc)
    print_report(result, sys.stdout)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(to_json(result), indent=1))
        print(f"wrote {json_path}")
