"""Atomic, resumable checkpoints: <run_dir>/checkpoints/step_000010/ holds everything for resuming
after 10 optimizer steps.

Every rank writes its part into step_000010.tmp/ (the torch recipes: the universal format,
universal.py; DeepSpeed's recipes: its own), all ranks meet at a barrier, then rank 0 writes meta.json
(manifest.py: step, format, recipe, world size and parallel degrees, the resume fingerprint, a size and
sha256 per file) and renames the directory: a directory without `.tmp` is complete. Resume picks the
newest complete checkpoint that passes every check (a damaged one is reported in one line and skipped; all
of them damaged is refused, start.py),
and refuses, before anything is written, one whose fingerprint (fingerprint.py) differs from the run's in
a field that may not change (start.py: resume, checkpoint.load_from, resharding). Retention
keeps the last `keep` plus every `keep_every`-th step and the folders their incremental tensor maps read
from (incremental.py), deleting older ones only after a newer checkpoint is complete. With
checkpoint.async_save the tensors are written in the background (writer.py): `begin_save` returns a
PendingSave that is published (meta.json, rename) only once every rank's write has finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from gpu_workbench.parallel.checkpoint.fingerprint import fingerprint
from gpu_workbench.parallel.checkpoint.listing import complete_checkpoints, newest_good, scan
from gpu_workbench.parallel.checkpoint.manifest import file_manifest, read_meta, referenced, verify

__all__ = ["PendingSave", "begin_save", "bytes_written_total", "complete_checkpoints", "file_manifest",
           "find_resumable", "load", "newest_good", "prune", "scan", "verify"]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prune(run_dir: Path, keep: int, keep_every: int = 0) -> None:
    """Delete complete checkpoints but the newest `keep`, those whose step is a multiple of keep_every, and
    every folder a kept incremental checkpoint reads tensors from (incremental.py)."""
    done = complete_checkpoints(run_dir)
    kept = done[-keep:] + [p for p in done[:-keep] if keep_every and int(p.name.split("_")[1]) % keep_every == 0]
    needed = {p.name for p in kept}
    for path in kept:
        meta, _ = read_meta(path)
        needed |= referenced(meta or {})
    for old in done:
        if old.name not in needed:
            shutil.rmtree(old, ignore_errors=True)


class PendingSave:
    """A checkpoint whose files are written (or being written in the background) but not yet published."""

    def __init__(self, engine, run_dir: Path, step: int, written, bytes_before: int, fmt: str):
        self.engine, self.run_dir, self.step, self.written, self.fmt = engine, Path(run_dir), step, written, fmt
        self.bytes_before = bytes_before
        self.final = self.run_dir / "checkpoints" / f"step_{step:06d}"
        self.tmp = self.run_dir / "checkpoints" / f"step_{step:06d}.tmp"

    def finished_everywhere(self) -> bool:
        """Whether every rank's background write has finished (collective: a min over the ranks)."""
        import torch

        done = torch.tensor([1 if self.written is None or self.written.finished() else 0])
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done.item())

    def publish(self, keep: int, keep_every: int = 0) -> Path:
        """Wait for this rank's write, then (rank 0, once every rank's is done) meta.json and the rename, the
        commit point, and retention. Collective."""
        if self.written is not None:
            self.written.wait()
        _barrier()
        if self.engine.ctx.rank == 0:
            (self.tmp / "meta.json").write_text(json.dumps(self._meta()))
            shutil.rmtree(self.final, ignore_errors=True)
            self.tmp.rename(self.final)   # the commit point
            prune(self.run_dir, keep, keep_every)   # only now that a newer checkpoint is complete
        _barrier()
        return self.final

    def _meta(self) -> dict:
        engine, files = self.engine, file_manifest(self.tmp)   # sizes and checksums: resume detects damage
        world, dims = engine.ctx.world_size, engine.ctx.dims
        own = sum(f["size"] for f in files.values())
        meta = {"step": self.step, "format": self.fmt,
                "recipe": engine.cfg.recipe, "world_size": world, "dims": dims.degrees() if dims else None,
                "fingerprint": fingerprint(engine.cfg, world), "files": files, "bytes_written": own,
                "bytes_written_total": self.bytes_before + own}
        if self.written is not None and self.written.tensors is not None:
            meta.update(tensors=self.written.tensors, chain=self.written.chain)
        return meta


def begin_save(engine, run_dir: Path, step: int, rank: int, fmt: str, previous: Path | None = None,
               bytes_before: int = 0) -> PendingSave:
    """Write (or, with checkpoint.async_save, stage and start writing) the state after `step` optimizer steps
    into step_N.tmp; `fmt`: the recipe's checkpoint_format, recorded in meta.json; `previous`: the checkpoint
    an incremental save builds on. Collective."""
    root = Path(run_dir) / "checkpoints"
    tmp = root / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    previous_meta = _previous_meta(previous, rank) if engine.cfg.checkpoint.incremental else None
    written = engine.save(tmp, step, previous_meta)
    return PendingSave(engine, run_dir, step, written, bytes_before, fmt)


def _previous_meta(previous: Path | None, rank: int) -> dict | None:
    """Rank 0's reading of the checkpoint an incremental save builds on, on every rank: one decision."""
    meta = read_meta(previous)[0] if rank == 0 and previous is not None and Path(previous).is_dir() else None
    if dist.is_initialized():
        box = [meta]
        dist.broadcast_object_list(box, src=0)
        meta = box[0]
    return meta



def bytes_written_total(path: Path | None) -> int:
    """The checkpoint bytes a run had written up to and including checkpoint `path` (0: none recorded)."""
    meta = read_meta(path)[0] if path is not None and Path(path).is_dir() else None
    return int((meta or {}).get("bytes_written_total", 0))


def find_resumable(run_dir: Path, cfg, world_size: int, is_main: bool, reader_format: str = "universal",
                   trusted: tuple = ()) -> Path | None:
    """This run directory's checkpoint to resume (None: none yet); a UserError on every rank if the newest
    good one does not fit this run. Collective. `trusted`: the classes the recipe pickles into its state
    files (Recipe.checkpoint_globals). Where a run starts, load_from included: start.decide."""
    from gpu_workbench.parallel.checkpoint.start import decide

    found = decide(run_dir, cfg, world_size, is_main, reader_format, trusted, resume_only=True)
    return Path(found.path) if found.path else None


def load(engine, path: Path, model_only: bool = False) -> int:
    """Load checkpoint `path` into the engine; the number of steps the run has taken (0: weights only)."""
    engine.load(Path(path), model_only)
    if model_only:
        return 0
    meta, _ = read_meta(path)
    return int(meta["step"])
