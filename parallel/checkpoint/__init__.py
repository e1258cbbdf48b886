"""Atomic, resumable checkpoints: <run_dir>/checkpoints/step_000010/ holds everything for resuming
after 10 optimizer steps.

Every rank writes its part into step_000010.tmp/ (the torch recipes: the universal format,
universal.py; DeepSpeed's recipes: its own), all ranks meet at a barrier, then rank 0 writes meta.json
(manifest.py: step, format, recipe, world size and parallel degrees, the resume fingerprint, a size and
sha256 per file) and renames the directory: a directory without `.tmp` is complete. Resume picks the
newest complete checkpoint that passes every check (a damaged one is reported in one line and skipped),
and refuses, before anything is written, one whose fingerprint (fingerprint.py) differs from the run's in
a field that may not change (start.py: resume, checkpoint.load_from, resharding). Retention
keeps the last `keep` plus every `keep_every`-th step, deleting older ones only after a newer
checkpoint is complete.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from parallel.checkpoint.fingerprint import fingerprint
from parallel.checkpoint.manifest import file_manifest, read_meta, verify

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
    engine.save(tmp, step)
    _barrier()
    if rank == 0:
        from parallel import recipes

        world, dims = engine.ctx.world_size, engine.ctx.dims
        meta = {"step": step, "format": recipes.get(engine.cfg.recipe).checkpoint_format,
                "recipe": engine.cfg.recipe, "world_size": world, "dims": dims.degrees() if dims else None,
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


def find_resumable(run_dir: Path, cfg, world_size: int, is_main: bool, reader_format: str = "universal",
                   trusted: tuple = ()) -> Path | None:
    """This run directory's checkpoint to resume (None: none yet); a UserError on every rank if the newest
    good one does not fit this run. Collective. `trusted`: the classes the recipe pickles into its state
    files (Recipe.checkpoint_globals). Where a run starts, load_from included: start.decide."""
    from parallel.checkpoint.start import decide

    found = decide(run_dir, cfg, world_size, is_main, reader_format, trusted, resume_only=True)
    return Path(found.path) if found.path else None


def load(engine, path: Path, model_only: bool = False) -> int:
    """Load checkpoint `path` into the engine; the number of steps the run has taken (0: weights only)."""
    engine.load(Path(path), model_only)
    if model_only:
        return 0
    meta, _ = read_meta(path)
    return int(meta["step"])
