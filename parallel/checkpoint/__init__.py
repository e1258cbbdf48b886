"""Atomic, resumable checkpoints: <run_dir>/checkpoints/step_000010/ holds everything for resuming
after 10 optimizer steps.

Every rank writes its part into step_000010.tmp/, all ranks meet at a barrier, then rank 0 writes
meta.json (manifest.py: step, recipe, world size, the resume fingerprint, a size and sha256 per file)
and renames the directory: a directory without `.tmp` is complete. Resume picks the newest complete
checkpoint that passes every check (a damaged one is reported in one line and skipped), and refuses,
before anything is written, one whose fingerprint (fingerprint.py) differs from the run's. Retention
keeps the last `keep` plus every `keep_every`-th step, deleting older ones only after a newer
checkpoint is complete.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from parallel.checkpoint.fingerprint import fingerprint, first_difference
from parallel.checkpoint.manifest import file_manifest, read_meta, verify
from parallel.errors import UserError

__all__ = ["complete_checkpoints", "file_manifest", "find_resumable", "load", "newest_good", "prune", "save",
           "verify"]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
            and p.name.split("_")[1].isdigit() and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def prune(run_dir: Path, keep: int, keep_every: int = 0) -> None:
    """Delete complete checkpoints but the newest `keep` and those whose step is a multiple of keep_every."""
    for old in complete_checkpoints(run_dir)[:-keep]:
        if keep_every and int(old.name.split("_")[1]) % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)


def save(engine, run_dir: Path, step: int, keep: int, rank: int, keep_every: int = 0) -> Path:
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
        world = engine.ctx.world_size
        meta = {"step": step, "recipe": engine.cfg.recipe, "world_size": world,
                "fingerprint": fingerprint(engine.cfg, world),
                "files": file_manifest(tmp)}   # sizes and checksums: resume detects a damaged checkpoint
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)   # the commit point
        prune(run_dir, keep, keep_every)   # only now that a newer checkpoint is complete
    _barrier()
    return final


def newest_good(run_dir: Path, trusted: tuple = ()) -> Path | None:
    """The newest complete checkpoint that passes every check; damaged ones are named and skipped."""
    for path in reversed(complete_checkpoints(run_dir)):
        problem = verify(path, trusted)
        if problem is None:
            return path
        print(f"wb: checkpoint {path} is damaged ({problem}); trying the previous one", file=sys.stderr)
    return None


def _resumable(run_dir: Path, cfg, world_size: int, trusted: tuple) -> tuple[str | None, str | None]:
    """(path of the checkpoint to resume, None) or (None, why it cannot be resumed)."""
    latest = newest_good(run_dir, trusted)
    if latest is None:
        return None, None
    meta, _ = read_meta(latest)
    saved = meta.get("fingerprint") or {"recipe": meta["recipe"], "world_size": meta["world_size"]}
    difference = first_difference(saved, fingerprint(cfg, world_size))
    if difference:
        return None, (f"cannot resume {latest}: {difference}; use another run_dir, or checkpoint.resume=false "
                      f"to start over")
    if meta["step"] > cfg.steps:
        return None, (f"cannot resume {latest}: it holds {meta['step']} steps, more than steps={cfg.steps}; "
                      f"raise steps, or use another run_dir")
    return str(latest), None


def find_resumable(run_dir: Path, cfg, world_size: int, is_main: bool, trusted: tuple = ()) -> Path | None:
    """The checkpoint this run resumes from (None: start fresh); a UserError on every rank if the newest
    good one does not fit this run. Collective: rank 0 checks the files once, every rank gets its answer.
    `trusted`: the classes the recipe pickles into its state files (Recipe.checkpoint_globals)."""
    answer = _resumable(run_dir, cfg, world_size, trusted) if is_main else (None, None)
    if dist.is_initialized():
        box = [answer]
        dist.broadcast_object_list(box, src=0)
        answer = box[0]
    path, problem = answer
    if problem:
        raise UserError(problem)
    return Path(path) if path else None


def load(engine, path: Path) -> int:
    """Load checkpoint `path` into the engine; the number of steps it holds."""
    engine.load(path)
    meta, _ = read_meta(path)
    return int(meta["step"])
