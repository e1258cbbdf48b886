"""Sources of `wb data prepare` and `wb data tokenizer train`: files or globs of plain text (one document
per file), JSON lines (one document per line, its `--text-field`) and Parquet (one per row of that column,
read with pyarrow). An empty, binary (a NUL byte) or non-UTF-8 file is skipped and counted, never
tokenized; a JSON line without the field is refused, naming the file and line."""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError

_GLOB = set("*?[")


def expand(patterns: list[str]) -> list[Path]:
    """Every file the SRC arguments name, in order, globs sorted; a name that matches nothing is refused."""
    found: list[Path] = []
    for pattern in patterns:
        if _GLOB & set(pattern):
            hits = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
            if not hits:
                raise UserError(f"SRC '{pattern}' matches no file")
            found += hits
        elif Path(pattern).is_dir():
            raise UserError(f"SRC {pattern} is a directory; name its files or a glob such as '{pattern}/**/*.txt'")
        elif not Path(pattern).is_file():
            raise UserError(f"SRC not found: {pattern}")
        else:
            found.append(Path(pattern))
    return list(dict.fromkeys(found))   # a file named twice is read once


def kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return "jsonl" if suffix in (".jsonl", ".json", ".ndjson") else "parquet" if suffix == ".parquet" else "text"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unusable(path: Path) -> str | None:
    """Why a file cannot be read as text ('empty', 'binary', 'not UTF-8'), or None. Parquet is binary by design."""
    if path.stat().st_size == 0:
        return "empty"
    if kind_of(path) == "parquet":
        return None
    data = path.read_bytes()
    if b"\0" in data:
        return "binary"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


def documents(path: Path, text_field: str) -> Iterator[str]:
    """The file's documents, in order."""
    kind = kind_of(path)
    if kind == "text":
        yield path.read_text(encoding="utf-8")
    elif kind == "jsonl":
        yield from _json_lines(path, text_field)
    else:
        yield from _parquet(path, text_field)


def _json_lines(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"SRC {path} line {number}: not JSON ({error.msg})") from None
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                what = "has no" if not isinstance(record, dict) or field not in record else "has a non-string"
                raise UserError(f"SRC {path} line {number} {what} field '{field}' (--text-field)")
            yield value


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as error:   # pyarrow's own reason (not Parquet, truncated), in one line
        raise UserError(f"SRC {path}: not a readable Parquet file ({error})") from None
    if field not in schema.names:
        raise UserError(f"SRC {path} has no column '{field}' (--text-field); it has {', '.join(schema.names)}")
    for batch in pq.ParquetFile(path).iter_batches(columns=[field], batch_size=1024):
        for number, value in enumerate(batch.column(0).to_pylist()):
            if not isinstance(value, str):
                raise UserError(f"SRC {path}: column '{field}' holds a non-string value ({value!r}) in a row "
                                f"near {number}")
            yield value


def pieces(text: str, size: int = 1 << 18) -> list[str]:
    """Cut a long document for parallel tokenizing only where the byte-level pre-tokenizer already splits
    (after a newline that a non-space character follows), so the pieces' tokens are the whole's."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return [p for p in out if p]
