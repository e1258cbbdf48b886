"""A user mistake that only a worker can find, told once: each rank writes its line to a folder the
launcher names, and the launcher prints rank 0's (the lowest rank's) line and exits 2.

    os.environ[ENV] = folder          # the launcher, before torchrun starts the workers
    if record(mistake): os._exit(2)   # a worker's UserError: its line goes to the folder, not to stderr
    line = first(folder)              # the launcher, after the workers failed: the line, or None
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "WB_WORKER_ERRORS"


def record(mistake: BaseException) -> bool:
    """Write this rank's one line into the launcher's folder; False when no launcher asked for it."""
    folder = os.environ.get(ENV)
    if not folder or "RANK" not in os.environ:
        return False
    path = Path(folder) / f"rank{int(os.environ['RANK']):06d}.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(mistake).replace("\n", " "))
    tmp.replace(path)   # whole, or not there: the launcher may read it as this rank dies
    return True


def first(folder: str | Path) -> str | None:
    """The lowest rank's line in the folder, or None if no worker wrote one."""
    lines = sorted(Path(folder).glob("rank*.txt"))
    return lines[0].read_text() if lines else None
