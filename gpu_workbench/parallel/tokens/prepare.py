"""`wb data prepare SRC... --tokenizer T --out DIR`: tokenize sources in worker processes into memory-mapped
shards (shards.py), one per source, and write the manifest last (the commit point).

Incremental: a source whose sha256 and the tokenizer's hash match the old manifest's, and whose shard is
intact, keeps its shard untouched. Documents are cut into pieces only where the pre-tokenizer splits
anyway (sources.pieces), so a long document tokenizes in parallel with the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.tokens import sources as src
from gpu_workbench.parallel.tokens.shards import FORMAT, MANIFEST, dtype_for
from gpu_workbench.parallel.tokens.tokenizer import Tokenizer

UNIT_CHARS = 1 << 18   # text per work unit handed to a worker: small enough to balance 2-16 workers
_WORKER: dict = {}


def _init_worker(spec: str, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # the processes are the parallelism
    _WORKER.update(tok=Tokenizer(spec), dtype=dtype)


def _encode_unit(unit: tuple[list[str], list[bool]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens with an EOS after each document that ends in this unit, the token count at each such end,
    the unit's characters)."""
    texts, ends = unit
    tok, parts, at, n = _WORKER["tok"], [], [], 0
    eos = np.asarray([tok.eos_id], dtype=np.uint32)
    for ids, end in zip(tok.encode(texts), ends, strict=True):
        parts += [ids, eos] if end else [ids]
        n += len(ids) + int(end)
        if end:
            at.append(n)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return tokens.astype(_WORKER["dtype"]), np.asarray(at, dtype=np.int64), sum(len(t) for t in texts)


def _units(path: Path, text_field: str) -> Iterator[tuple[list[str], list[bool]]]:
    texts, ends, size = [], [], 0
    for doc in src.documents(path, text_field):
        cut = src.pieces(doc)
        for i, piece in enumerate(cut):
            texts.append(piece)
            ends.append(i == len(cut) - 1)
            size += len(piece)
            if size >= UNIT_CHARS:
                yield texts, ends
                texts, ends, size = [], [], 0
    if texts:
        yield texts, ends


def _write_shard(path: Path, text_field: str, shard: Path, pool, bar) -> tuple[int, np.ndarray, str]:
    """Tokenize one source into `shard` (and its .idx); (tokens, document offsets, shard sha256)."""
    digest, total, offsets = hashlib.sha256(), 0, [np.zeros(1, dtype=np.int64)]
    tmp = shard.with_name(shard.name + ".tmp")
    mapper = pool.imap if pool is not None else map
    with open(tmp, "wb") as f:
        for tokens, ends, chars in mapper(_encode_unit, _units(path, text_field)):
            data = tokens.tobytes()
            f.write(data)
            digest.update(data)
            offsets.append(ends + total)
            total += len(tokens)
            bar.update(chars)
    tmp.replace(shard)
    index = np.concatenate(offsets)
    index.tofile(shard.with_suffix(".idx"))
    return total, index, digest.hexdigest()


def _reusable(old: dict | None, tok: Tokenizer, source: str, sha: str, out: Path) -> dict | None:
    if not old or old["tokenizer"]["hash"] != tok.hash:
        return None
    for entry in old["sources"]:
        shard = out / "shards" / entry["shard"]
        if entry["source"] == source and entry["sha256"] == sha and shard.is_file() and \
                shard.stat().st_size == entry["tokens"] * np.dtype(old["dtype"]).itemsize:
            return entry
    return None


def _old_manifest(out: Path) -> dict | None:
    try:
        old = json.loads((out / MANIFEST).read_text())
        return old if old.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def prepare(patterns: list[str], tokenizer: str, out: Path, text_field: str = "text", workers: int = 0,
            progress: bool | None = None) -> dict:
    """Prepare DIR from the sources; returns the manifest, plus "reused": the sources not tokenized again."""
    files, tok = src.expand(patterns), Tokenizer(tokenizer)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    old, dtype = _old_manifest(out), dtype_for(tok.vocab_size)
    usable, skipped = [], {}
    for path in files:
        reason = src.unusable(path)
        if reason:
            skipped.setdefault(reason, []).append(str(path))
        else:
            usable.append(path)
    if not usable:
        raise UserError(f"no usable SRC file: all {len(files)} skipped ({_skip_text(skipped)})")
    _say_skipped(skipped, len(files))
    workers = workers or os.cpu_count() or 1
    entries, reused = _tokenize_all(usable, tok, out, old, dtype, text_field, workers, progress)
    manifest = {"format": FORMAT, "tokenizer": tok.describe(), "dtype": dtype, "text_field": text_field,
                "sources": entries, "tokens": sum(e["tokens"] for e in entries),
                "documents": sum(e["documents"] for e in entries),
                "skipped": {k: len(v) for k, v in skipped.items()}}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out / MANIFEST)   # the commit point
    _remove_orphans(out, entries)
    return {**manifest, "reused": reused}


def _tokenize_all(usable: list[Path], tok: Tokenizer, out: Path, old: dict | None, dtype: str, text_field: str,
                  workers: int, progress: bool | None) -> tuple[list[dict], int]:
    from tqdm import tqdm

    plan = [(p, src.sha256(p)) for p in usable]
    todo = [(p, sha) for p, sha in plan if _reusable(old, tok, str(p), sha, out) is None]
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tok.spec, dtype)) \
        if workers > 1 and todo else None
    if pool is None:
        _init_worker(tok.spec, dtype)
    entries, reused = [], 0
    try:
        with tqdm(total=sum(p.stat().st_size for p, _ in todo), unit="B", unit_scale=True, desc="tokenizing",
                  disable=None if progress is None else not progress, file=sys.stderr) as bar:
            for number, (path, sha) in enumerate(plan):
                entry = _reusable(old, tok, str(path), sha, out)
                if entry is None:
                    shard = out / "shards" / f"{number:05d}-{sha[:16]}.bin"
                    tokens, index, shard_sha = _write_shard(path, text_field, shard, pool, bar)
                    entry = {"source": str(path), "sha256": sha, "kind": src.kind_of(path), "shard": shard.name,
                             "index": shard.with_suffix(".idx").name, "shard_sha256": shard_sha, "tokens": tokens,
                             "documents": len(index) - 1}
                else:
                    reused += 1
                entries.append(entry)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return entries, reused


def _remove_orphans(out: Path, entries: list[dict]) -> None:
    keep = {e["shard"] for e in entries} | {e["index"] for e in entries}
    for path in (out / "shards").iterdir():
        if path.name not in keep:
            path.unlink()


def _skip_text(skipped: dict[str, list[str]]) -> str:
    return ", ".join(f"{len(v)} {k}" for k, v in skipped.items())


def _say_skipped(skipped: dict[str, list[str]], total: int) -> None:
    if skipped:
        names = [n for v in skipped.values() for n in v]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        print(f"wb: skipped {len(names)} of {total} SRC files ({_skip_text(skipped)}): {', '.join(names[:3])}{more}",
              file=sys.stderr)
