"""Run selected ranks of a job under a profiler (nsys, ncu) and the rest untouched.

`wb profile nsys --ranks 0 -- wb train --nproc 4 ...` cannot put nsys in front of torchrun (that
would profile every rank into one report). Instead it sets WB_RANK_WRAP to a command prefix with a
`{rank}` placeholder and the ranks to wrap; each process of the job calls `exec_under_tool_if_asked()`
first thing, and a selected rank re-executes itself under the tool (same PID, so torchrun still
supervises it), writing its own report.
"""

from __future__ import annotations

import json
import os
import sys

ENV = "WB_RANK_WRAP"
_DONE = "WB_RANK_WRAPPED"


def wrap_env(prefix: list[str], ranks: list[int] | None, multi_process: bool) -> dict:
    """`multi_process`: the command launches worker processes (torchrun sets RANK in each); only those
    are wrapped, not the launcher. Otherwise the command's own process is rank 0."""
    return {ENV: json.dumps({"prefix": prefix, "ranks": ranks, "multi_process": multi_process})}


def exec_under_tool_if_asked(argv: list[str] | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec or os.environ.get(_DONE):
        return
    config = json.loads(spec)
    if config["multi_process"] and "RANK" not in os.environ:
        return  # the launcher of a multi-process job: its workers get wrapped instead
    rank = int(os.environ.get("RANK", "0"))
    if config["ranks"] is not None and rank not in config["ranks"]:
        return
    prefix = [part.replace("{rank}", str(rank)) for part in config["prefix"]]
    argv = argv if argv is not None else [sys.executable, *sys.orig_argv[1:]]
    os.environ[_DONE] = "1"
    os.execvp(prefix[0], prefix + argv)
