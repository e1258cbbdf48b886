"""Helpers for the cluster tests: the real CLI in subprocesses, one tiny deterministic job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.parallel.runs import ROOT, TINY, final_params, losses, max_rel_diff, summary  # noqa: F401

# 6 steps of the tiny model, a checkpoint every 2 steps (keep 1), the final parameters saved.
JOB = ["steps=6", "progress=false", "checkpoint.every=2", "checkpoint.keep=1", "checkpoint.save_final=true"]
KILL = ["fault.kill_rank=1", "fault.at_step=3"]   # rank 1 dies starting step 3: the checkpoint after 2 is complete
VENV_BIN = str(Path(sys.executable).parent)


def env(**extra: str) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PATH=VENV_BIN + os.pathsep + os.environ["PATH"])
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "RAY_ADDRESS", "TORCHELASTIC_RUN_ID"):
        e.pop(key, None)
    e.update(extra)
    return e


def wb(*args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench", *args], cwd=ROOT, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
