"""Atomic, resumable checkpoints: <run_dir>/checkpoints/step_000010/ holds everything for resuming
after 10 optimizer steps. Every rank writes its part into step_000010.tmp/, all ranks meet at a
barrier, then rank 0 renames it: a directory without `.tmp` is complete. Resume picks the newest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
            and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save(engine, run_dir: Path, step: int, keep: int, rank: int) -> Path:
    """Save the state after `step` optimizer steps. Collective: every rank calls it."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save(tmp)
    _barrier()
    if rank == 0:
        meta = {"step": step, "recipe": engine.cfg.recipe, "world_size": engine.ctx.world_size}
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)   # the commit point
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def resume(engine, run_dir: Path) -> int:
    """Load the newest complete checkpoint; return the number of steps it holds (0 if none)."""
    found = complete_checkpoints(run_dir)
    if not found:
        return 0
    latest = found[-1]
    meta = json.loads((latest / "meta.json").read_text())
    # Each recipe lays its state out differently (and shards it by the world size): refuse a mismatch.
    ours = {"recipe": engine.cfg.recipe, "world_size": engine.ctx.world_size}
    theirs = {k: meta.get(k, v) for k, v in ours.items()}
    if theirs != ours:
        raise ValueError(f"checkpoint {latest} was written by recipe={theirs['recipe']} on {theirs['world_size']} "
                         f"process(es), this run is recipe={ours['recipe']} on {ours['world_size']}: use another "
                         f"run_dir, or checkpoint.resume=false to start over")
    engine.load(latest)
    return int(meta["step"])
