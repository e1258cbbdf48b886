"""One writer per run directory: `<run_dir>/.lock` while a process trains in it.

    with RunLock(run_dir):           # refuses (UserError) while another live process holds it
        ...                          # a lock left by a dead process is taken over, with a message

The lock file holds the holder's host, PID, start time and a token. A launcher that starts several
processes (`wb train --nproc N`, torchrun restarts) takes it once and hands its token to its workers
in WB_RUN_LOCK_TOKEN, so they write under their launcher's lock instead of refusing it. Created with
O_EXCL, so two processes racing for a free directory cannot both win.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError

TOKEN_ENV = "WB_RUN_LOCK_TOKEN"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # it exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.token: str | None = None
        self.owned = False

    def acquire(self) -> RunLock:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise UserError(f"run_dir (--run-dir) {self.path.parent} is a file, not a directory")
        inherited = os.environ.get(TOKEN_ENV)
        holder = self._read()
        if inherited and holder and holder.get("token") == inherited:
            self.token = inherited   # our launcher's lock: write under it, do not release it
            return self
        if holder is not None and not self._stale(holder):
            raise UserError(f"run directory {self.path.parent} is in use: wb train (PID {holder.get('pid')} on "
                            f"{holder.get('host')}, since {holder.get('started')}) holds {self.path}; wait for it, "
                            f"or choose another --run-dir")
        from gpu_workbench.parallel.runtime import marker

        marker.check(self.path.parent)   # a folder of the user's own is refused before the lock is written
        if holder is not None:
            print(f"wb: taking over the stale lock of PID {holder.get('pid')} on {holder.get('host')} (no longer "
                  f"running) in {self.path.parent}", file=sys.stderr)
            self.path.unlink(missing_ok=True)
        self._create()
        return self

    def _create(self) -> None:
        self.token = uuid.uuid4().hex
        info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:   # another process won the race since we looked
            raise UserError(f"run directory {self.path.parent} is in use: another wb train took {self.path} "
                            f"just now; choose another --run-dir") from None
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        self.owned = True

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}   # unreadable: a crash while writing it; stale unless proven alive

    def _stale(self, holder: dict) -> bool:
        if not holder:   # unreadable or empty: a writer that died mid-write, unless it is being written now
            return time.time() - self.path.stat().st_mtime > 10
        if holder.get("host") != socket.gethostname():
            return False   # another machine's process: we cannot tell, so it is not ours to take
        pid = holder.get("pid")
        return not isinstance(pid, int) or not _alive(pid)

    def release(self) -> None:
        """Remove the lock file if this process made it (and nobody has taken it over since)."""
        if self.owned and (self._read() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.owned = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
