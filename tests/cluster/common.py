"""Helpers for the cluster tests: the real CLI in subprocesses, one tiny deterministic job."""

from __future__ import annotations

import socket

from tests.helpers.cli import ROOT, VENV_BIN, env, wb  # noqa: F401  (the shared CLI helper, re-exported)
from tests.helpers.runs import TINY, final_params, losses, max_rel_diff, summary  # noqa: F401

# 6 steps of the tiny model, a checkpoint every 2 steps (keep 1), the final parameters saved.
JOB = ["steps=6", "progress=false", "checkpoint.every=2", "checkpoint.keep=1", "checkpoint.save_final=true"]
KILL = ["fault.kill_rank=1", "fault.at_step=3"]   # rank 1 dies starting step 3: the checkpoint after 2 is complete


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
