"""Atomic, resumable checkpoints: <run_dir>/checkpoints/step_000010/ holds everything for resuming
after 10 optimizer steps. Every rank writes its part into step_000010.tmp/, all ranks meet at a
barrier, then rank 0 renames it: a directory without `.tmp` is complete. meta.json lists every file
with its size and sha256; resume picks the newest complete checkpoint that passes that check (a
truncated or corrupted one is reported and skipped, as is one whose .pt files do not load with
weights_only=True). Retention keeps the last `keep` plus every `keep_every`-th step, deleting older
ones only after a newer checkpoint is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from parallel.errors import UserError


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


def file_manifest(directory: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under `directory` except meta.json."""
    out = {}
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file() and p.name != "meta.json":
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[str(p.relative_to(directory))] = {"size": p.stat().st_size, "sha256": h.hexdigest()}
    return out


def verify(path: Path) -> str | None:
    """None if the checkpoint's files match its manifest (sizes, then sha256), else what is wrong."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e})"
    files = meta.get("files")
    if files is None:
        return None   # written before manifests existed: trusted as complete
    for rel, want in files.items():
        p = Path(path) / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != want["size"]:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {want['size']}"
    actual = file_manifest(path)
    for rel, want in files.items():
        if actual[rel]["sha256"] != want["sha256"]:
            return f"{rel} fails its sha256 check"
    return unsafe_pickle(path)


def _trusted_globals() -> list:
    """The few non-tensor classes DeepSpeed pickles into its checkpoints (if DeepSpeed is in use)."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def unsafe_pickle(path: Path) -> str | None:
    """None if every .pt file under `path` loads with torch.load(weights_only=True): tensors, containers
    and plain values only, no arbitrary pickle. DeepSpeed's own loader then reads the very same bytes
    (sha256-checked) with weights_only=False; the other recipes load with weights_only=True anyway.
    mmap=True: the check reads the pickles, not the tensor data."""
    import torch

    for p in sorted(Path(path).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(_trusted_globals()):
                torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:   # noqa: BLE001 - any failure means: do not load this checkpoint
            return f"{p.relative_to(path)} does not load with weights_only=True ({str(e).splitlines()[0][:200]})"
    return None


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
        meta = {"step": step, "recipe": engine.cfg.recipe, "world_size": engine.ctx.world_size,
                "files": file_manifest(tmp)}   # sizes and checksums: resume detects a damaged checkpoint
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)   # the commit point
        prune(run_dir, keep, keep_every)   # only now that a newer checkpoint is complete
    _barrier()
    return final


def newest_good(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files pass the manifest check; damaged ones are skipped."""
    for path in reversed(complete_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        print(f"wb: checkpoint {path} is damaged ({problem}); trying the previous one", file=sys.stderr)
    return None


def resume(engine, run_dir: Path) -> int:
    """Load the newest complete checkpoint; return the number of steps it holds (0 if none)."""
    latest = newest_good(run_dir) if engine.ctx.is_main else None
    if dist.is_initialized():   # rank 0 checks the files once; every rank loads the same checkpoint
        box = [str(latest) if latest else None]
        dist.broadcast_object_list(box, src=0)
        latest = Path(box[0]) if box[0] else None
    if latest is None:
        return 0
    meta = json.loads((latest / "meta.json").read_text())
    # Each recipe lays its state out differently (and shards it by the world size): refuse a mismatch.
    ours = {"recipe": engine.cfg.recipe, "world_size": engine.ctx.world_size}
    theirs = {k: meta.get(k, v) for k, v in ours.items()}
    if theirs != ours:
        raise UserError(f"checkpoint {latest} was written by recipe={theirs['recipe']} on {theirs['world_size']} "
                         f"process(es), this run is recipe={ours['recipe']} on {ours['world_size']}: use another "
                         f"run_dir, or checkpoint.resume=false to start over")
    engine.load(latest)
    return int(meta["step"])
