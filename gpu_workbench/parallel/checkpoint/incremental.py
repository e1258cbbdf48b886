"""Incremental checkpoints (`checkpoint.incremental`): a save writes only the tensors whose content changed
since the previous checkpoint, and a full base every `checkpoint.full_every` saves.

Every checkpoint's meta.json holds a tensor map, {DCP key: {"sha256", "in"}}: each key of the whole state,
its content hash and the step folder whose dcp/ holds its current bytes (this folder for what it wrote, an
older one for what did not change). A load reads each key once, from the folder the map names (no replay
of a chain from its base), and retention keeps every folder that a kept checkpoint's map names.

A key's hash is over every writing rank's local shard (rank order), so it is one decision on every rank;
a resharded resume changes the shards, hence every hash: its first save writes everything (correct, not
minimal). Non-tensor leaves (none in the torch recipes' state) are always written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def flat_leaves(nested: dict, prefix: str = "") -> dict[str, object]:
    """{DCP key ('model.tok_emb.weight', 'optimizer.x.exp_avg'): leaf}; DCP joins nested keys with dots."""
    out = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_leaves(v, key + "."))
        else:
            out[key] = v
    return out


def select(nested: dict, keep: set[str], prefix: str = "") -> dict:
    """The part of a nested state dict whose leaves' DCP keys are in `keep` (empty sub-dicts dropped)."""
    out = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            part = select(v, keep, key + ".")
            if part:
                out[k] = part
        elif key in keep:
            out[k] = v
    return out


def _digest(value) -> str | None:
    """sha256 of this rank's bytes of a tensor (a DTensor's local shard) with its shape and dtype."""
    if not isinstance(value, torch.Tensor):
        return None
    local = value.to_local() if hasattr(value, "to_local") else value
    data = local.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{tuple(local.shape)} {local.dtype}".encode())
    h.update(memoryview(data.view(torch.uint8).numpy()))
    return h.hexdigest()


def key_hashes(request: dict) -> dict[str, str | None]:
    """{DCP key: hash over every rank's shard of it} (None: a non-tensor leaf). Collective."""
    import torch.distributed as dist

    local = {k: _digest(v) for k, v in flat_leaves(request).items()}
    everyone = [local]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
    combined: dict[str, str | None] = {}
    for key in sorted({k for rank in everyone for k in rank}):
        parts = [rank[key] for rank in everyone if key in rank]
        if any(p is None for p in parts):
            combined[key] = None
            continue
        combined[key] = hashlib.sha256(" ".join(parts).encode()).hexdigest()
    return combined


def plan(hashes: dict[str, str | None], previous: dict | None, folder: str, full: bool) -> tuple[set[str], dict]:
    """(the keys this save writes, its tensor map). `previous`: the last checkpoint's map (None: write all)."""
    old = {} if full or previous is None else previous
    # a key whose bytes live in a folder of this very name is written again: the save replaces that folder
    # (a step saved anew after a nan_policy rollback)
    write = {k for k, h in hashes.items() if h is None or old.get(k, {}).get("sha256") != h
             or old[k]["in"] == folder}
    tensors = {k: {"sha256": h, "in": folder if k in write else old[k]["in"]} for k, h in hashes.items()}
    return write, tensors


def is_full(previous_meta: dict | None, full_every: int) -> bool:
    """Whether this save is a base: no previous checkpoint to build on, or the chain is full_every long."""
    if previous_meta is None or "tensors" not in previous_meta:
        return True
    return int(previous_meta.get("chain", 0)) + 1 >= full_every


def folders_of(meta: dict, own: Path) -> dict[Path, set[str]]:
    """{step folder: the DCP keys to read from it}; a checkpoint without a map keeps all in its own dcp/."""
    tensors = meta.get("tensors")
    if not tensors:
        return {Path(own): set()}   # empty set: everything
    out: dict[Path, set[str]] = {}
    for key, entry in tensors.items():
        out.setdefault(Path(own).parent / entry["in"], set()).add(key)
    return out
