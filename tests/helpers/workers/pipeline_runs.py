"""Runs for the pipeline tests, several per torchrun launch (one interpreter start per rank).

Run as a script under torchrun, it goes through its JSON argument in order: `[config, overrides]`
trains that config; `["copy", src, dst, step]` makes dst a run directory holding only src's
checkpoint after `step` steps (rank 0 copies, every rank waits), so the next item resumes from it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tests.helpers.cli import torchrun as launch
from tests.helpers.runs import BASE, TINY

PIPE = [*BASE, "recipe=pipeline", "pp.gantt=false"]   # the Gantt PNG costs ~1 s of matplotlib; the CLI test draws one
# Compute-dominated micro-batches for the bubble: ~10 ms forward per stage and micro-batch on one CPU
# core, so that p2p latency and Python overhead (~0.1-1 ms per op over gloo) stay small beside it.
HEAVY = ["steps=8", "progress=false", "checkpoint.every=0", "recipe=pipeline", "pp.gantt=false", "model.d_model=256",
         "model.seq_len=64", "model.n_layers=4", "micro_batch=4", "optim.warmup_steps=2"]


def heavy(schedule: str, m: int, run_dir: Path) -> tuple[str, list[str]]:
    return TINY, [*HEAVY, f"pp.schedule={schedule}", f"global_batch={4 * m}", f"pp.microbatches={m}",
                  f"run_dir={run_dir}"]


def torchrun(nproc: int, items: list, timeout: int = 600) -> None:
    launch(__file__, nproc, json.dumps(items, default=str), timeout=timeout)


def _copy_checkpoint(src: str, dst: str, step: int) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        name = f"step_{step:06d}"
        shutil.copytree(Path(src) / "checkpoints" / name, Path(dst) / "checkpoints" / name)
    dist.barrier()


if __name__ == "__main__":
    from gpu_workbench.parallel import RunConfig, train

    for item in json.loads(sys.argv[1]):
        if item[0] == "copy":
            _copy_checkpoint(*item[1:])
        else:
            train(RunConfig.from_toml(item[0], item[1]))
