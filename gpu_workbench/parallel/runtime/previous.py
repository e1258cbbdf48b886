"""A fresh start in a used run directory (`checkpoint.resume=false`) keeps the old run: everything of it
(checkpoints/, metrics.jsonl, config.json, summary.json, run.json, ...) moves into
`<run_dir>/previous/<UTC time stamp>/` before the new run writes anything. Earlier `previous/` entries and the
lock stay where they are. The moves are renames within one directory tree: nothing is copied or deleted.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

ROOT = "previous"
KEPT = {ROOT, ".lock"}


def old_entries(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.iterdir() if p.name not in KEPT) if run_dir.is_dir() else []


def _free_slot(root: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slot, n = root / stamp, 1
    while slot.exists():   # two fresh starts within one second
        slot, n = root / f"{stamp}-{n}", n + 1
    return slot


def move_aside(run_dir: Path) -> Path | None:
    """Move the old run out of the way; where it went (None: there was nothing to move)."""
    entries = old_entries(run_dir)
    if not entries:
        return None
    slot = _free_slot(Path(run_dir) / ROOT)
    slot.mkdir(parents=True)
    for entry in entries:
        os.rename(entry, slot / entry.name)
    return slot
