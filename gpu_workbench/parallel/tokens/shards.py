"""A prepared dataset directory (`wb data prepare --out DIR`), and reading it back.

    DIR/manifest.json          format, tokenizer (spec, sha256, vocab_size, eos_id), dtype, sources: per
                               source its path, sha256, shard, index, shard_sha256, tokens, documents
    DIR/shards/NNNNN-<sha>.bin the source's tokens, uint16 when the vocabulary fits, else uint32; every
                               document followed by the EOS token (concatenated: packing is concat-then-split)
    DIR/shards/NNNNN-<sha>.idx int64 document offsets into the shard, documents + 1 of them (0 first)

`open_dataset` maps every shard with numpy.memmap after checking its size and sha256 against the manifest:
a shard truncated or changed since prepare is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpu_workbench.parallel.runtime.errors import UserError

FORMAT = "wb-tokens/1"
MANIFEST = "manifest.json"


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_manifest(folder: Path, what: str = "data.path") -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{what} {folder}: no {MANIFEST} (make the dataset with `wb data prepare SRC... "
                        f"--tokenizer T --out {folder}`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{what} {folder}: {MANIFEST} is not a {FORMAT} manifest")
    return manifest


def identity(folder: Path) -> str:
    """What a checkpoint remembers of the dataset: the sha256 of its manifest (every source's and shard's
    hash, the tokenizer's hash, the counts)."""
    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()


@dataclass
class TokenData:
    """One prepared dataset: its shards concatenated into one token stream `tokens` (a list of memmaps read
    through `window`), the document starts `doc_starts` (int64, stream coordinates), the manifest."""

    folder: Path
    manifest: dict
    shards: list[np.ndarray]
    bounds: np.ndarray       # shard i holds stream positions bounds[i] .. bounds[i + 1]
    doc_starts: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.bounds[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Stream tokens [start, start + length) as int64 (a window may span shards)."""
        out, pos = np.empty(length, dtype=np.int64), start
        i = int(np.searchsorted(self.bounds, start, side="right")) - 1
        while pos < start + length:
            lo, hi = pos - int(self.bounds[i]), min(start + length, int(self.bounds[i + 1])) - int(self.bounds[i])
            out[pos - start:pos - start + hi - lo] = self.shards[i][lo:hi]
            pos += hi - lo
            i += 1
        return out

    def doc_ids(self, start: int, length: int) -> np.ndarray:
        """Each position's document number (int64), for the document mask."""
        return np.searchsorted(self.doc_starts, np.arange(start, start + length), side="right") - 1


def open_dataset(folder: str | Path, what: str = "data.path", verify: bool = True) -> TokenData:
    folder = Path(folder)
    manifest = read_manifest(folder, what)
    shards, bounds, starts = [], [0], []
    for entry in manifest["sources"]:
        shard = folder / "shards" / entry["shard"]
        size = shard.stat().st_size if shard.is_file() else -1
        itemsize = np.dtype(manifest["dtype"]).itemsize
        if size != entry["tokens"] * itemsize:
            raise UserError(f"{what} {folder}: shard {entry['shard']} (from {entry['source']}) is "
                            f"{'missing' if size < 0 else f'{size} bytes'}, the manifest says "
                            f"{entry['tokens'] * itemsize}: truncated since prepare; run `wb data prepare` again")
        if verify and _sha256(shard) != entry["shard_sha256"]:
            raise UserError(f"{what} {folder}: shard {entry['shard']} (from {entry['source']}) changed since "
                            f"prepare (its sha256 differs from the manifest's); run `wb data prepare` again")
        shards.append(np.memmap(shard, dtype=manifest["dtype"], mode="r"))
        index = np.fromfile(folder / "shards" / entry["index"], dtype=np.int64)
        starts.append(index[:-1] + bounds[-1])
        bounds.append(bounds[-1] + entry["tokens"])
    doc_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    return TokenData(folder, manifest, shards, np.asarray(bounds, dtype=np.int64), doc_starts)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
