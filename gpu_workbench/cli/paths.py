"""Output paths the user names (--run-dir, --out, --json), checked before any work starts.

    output_dir(Path("runs/x"), "--run-dir")     # a directory the command creates or writes into
    output_file(Path("rows.json"), "--json")    # a file the command writes at the end

Each returns the path unchanged, or raises a UserError naming the option when the path cannot be one:
a directory that is an existing file, a path under a regular file, a folder without write permission,
a file that is an existing directory. Nothing is created or touched here.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError


def _nearest_existing(path: Path) -> Path:
    """`path` or the closest of its ancestors that exists (`.` for a relative path at worst)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_folder(path: Path, base: Path, option: str) -> None:
    if not base.is_dir():
        raise UserError(f"{option} {path}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: no permission to write in {base}")


def output_dir(path: str | Path, option: str) -> Path:
    """A directory the command will create (with its parents) or write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a directory; choose another path")
    _writable_folder(path, _nearest_existing(path), option)
    return path


def output_file(path: str | Path, option: str) -> Path:
    """A file the command will write (its missing parent folders created then)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name, e.g. {path / 'rows.json'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UserError(f"{option} {path}: no permission to write this file")
        return path
    _writable_folder(path, _nearest_existing(path.parent), option)
    return path
