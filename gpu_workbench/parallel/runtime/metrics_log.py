"""Reading metrics.jsonl back (a resume keeps its earlier rows). The log is appended line by line, so a
SIGKILL or a full disk can leave its LAST line torn: no trailing newline and not valid JSON. That line is
dropped (the resume writes its step again). Any other damaged line means the file was edited or broken
some other way: it is refused in one line naming the file and line, and nothing is changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError

NAME = "metrics.jsonl"


def _torn(last: str) -> bool:
    try:
        json.loads(last)
    except ValueError:
        return True
    return False


def parse(run_dir: str | Path) -> tuple[list[dict], int | None]:
    """(the rows, the line number of a torn last line that was dropped, or None)."""
    path = Path(run_dir) / NAME
    if not path.is_file():
        return [], None
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    torn = None
    if lines[-1].strip() and _torn(lines[-1]):   # the last line, with no newline after it
        torn = len(lines)
        lines.pop()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UserError(f"{path}:{number}: damaged line (not a JSON metrics record with an integer step); "
                            f"repair or delete that line, or start over with checkpoint.resume=false (the old run "
                            f"is kept under previous/)")
        rows.append(row)
    return rows, torn


def check(run_dir: str | Path) -> str | None:
    """Refuse a damaged metrics.jsonl (UserError); the note to print if a torn last line will be dropped."""
    _, torn = parse(run_dir)
    if torn is None:
        return None
    return (f"{Path(run_dir) / NAME}:{torn}: dropping a torn last line (an interrupted write); the resumed run "
            f"writes its step again")
