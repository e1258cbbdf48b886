"""A checkpoint's manifest (meta.json) and the checks that decide whether a checkpoint can be trusted.

meta.json: {"step", "format", "recipe", "world_size", "dims", "fingerprint", "files": {relative path: {size, sha256}},
"bytes_written", "bytes_written_total"} and, for the universal format's tensors, "tensors": {DCP key: {sha256, in}},
"chain" (deltas since the base; incremental.py).
A checkpoint is good when its meta.json is a complete, consistent record (its step is the directory's),
every listed file has its size and sha256, and every .pt file loads with weights_only=True. One
without a file list (written before manifests existed) is not trusted: it is verified by loading
every state file in full.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


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


def read_meta(path: Path) -> tuple[dict | None, str | None]:
    """(meta, None), or (None, what is wrong with it)."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return None, f"meta.json unreadable ({e})"
    step = int(Path(path).name.split("_")[1])
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        return None, "meta.json has no step"
    if meta["step"] != step:
        return None, f"meta.json says step {meta['step']}, the directory step {step}"
    if not isinstance(meta.get("recipe"), str) or not isinstance(meta.get("world_size"), int):
        return None, "meta.json lacks the recipe or world size that wrote it"
    if "files" in meta and not isinstance(meta["files"], dict):
        return None, "meta.json's file list is not a mapping"
    return meta, None


def verify(path: Path, trusted: tuple = ()) -> str | None:
    """None if the checkpoint can be trusted, else what is wrong with it. `trusted`: the non-tensor classes
    the recipe's engine pickles into its state files (Recipe.checkpoint_globals). An incremental
    checkpoint (incremental.py) is sound when its own files are and so are the older folders it reads from."""
    meta, problem = read_meta(path)
    if problem:
        return problem
    files = meta.get("files")
    if files is None and meta.get("format") == "universal":   # its DCP files can be checked against nothing
        return "meta.json has no file list (a universal checkpoint always has one)"
    if files is None:   # no manifest to check against: load every state file in full
        return _loads(path, trusted, full=True)
    return verify_files(path, meta) or check_references(path, meta) or _loads(path, trusted, full=False)


def verify_files(path: Path, meta: dict) -> str | None:
    """None if every file of the manifest is there with its size and sha256."""
    files = meta["files"]
    for rel, want in files.items():
        p = Path(path) / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = want.get("size") if isinstance(want, dict) else None
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {size}"
    actual = file_manifest(path)
    for rel, want in files.items():
        if actual[rel]["sha256"] != want.get("sha256"):   # a dict: the size check passed
            return f"{rel} fails its sha256 check"
    return None


def _loads(path: Path, trusted: tuple, full: bool) -> str | None:
    """None if every .pt file under `path` loads with torch.load(weights_only=True): tensors, containers
    and plain values only, no arbitrary pickle. DeepSpeed's own loader then reads the very same bytes
    (sha256-checked) with weights_only=False; the other recipes load with weights_only=True anyway.
    full=False reads only the pickles (mmap), for files whose bytes the manifest already checked."""
    import torch

    for p in sorted(Path(path).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(list(trusted)):
                torch.load(p, map_location="cpu", weights_only=True, mmap=not full)
        except Exception as e:   # noqa: BLE001 - any failure means: do not load this checkpoint
            return f"{p.relative_to(path)} does not load with weights_only=True ({str(e).splitlines()[0][:200]})"
    return None


def referenced(meta: dict) -> set[str]:
    """The step folder names a checkpoint's map reads from (itself included)."""
    return {entry["in"] for entry in (meta.get("tensors") or {}).values()}


def check_references(path: Path, meta: dict) -> str | None:
    """None if every older folder a delta reads from is there and holds the bytes its map says."""
    for name in sorted(referenced(meta) - {Path(path).name}):
        other = Path(path).parent / name
        other_meta, problem = read_meta(other) if other.is_dir() else (None, "missing")
        if problem:
            return f"it reads tensors from {name}, which is {problem}"
        mine = {k for k, e in meta["tensors"].items() if e["in"] == name}
        theirs = other_meta.get("tensors") or {}
        wrong = next((k for k in sorted(mine) if theirs.get(k, {}).get("sha256") != meta["tensors"][k]["sha256"]
                      or theirs[k].get("in") != name), None)
        if wrong:
            return f"it reads {wrong} from {name}, which does not hold those bytes"
        problem = verify_files(other, other_meta)
        if problem:
            return f"it reads tensors from {name}, which is damaged ({problem})"
    return None
