"""The uninterrupted 2-process reference run, shared by the torchrun and Ray kill-and-resume tests."""

from __future__ import annotations

import time

import pytest

from tests.cluster.common import JOB, TINY, wb


@pytest.fixture(scope="session")
def clean_ddp(tmp_path_factory):
    """`wb train --recipe ddp --nproc 2` (launcher local: torchrun), per-rank logs: (run_dir, log_dir, seconds)."""
    root = tmp_path_factory.mktemp("clean")
    run_dir, log_dir = root / "run", root / "logs"
    t0 = time.perf_counter()
    done = wb("train", "--recipe", "ddp", "--nproc", "2", "--config", TINY, "--run-dir", str(run_dir),
              "--log-dir", str(log_dir), *JOB)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return run_dir, log_dir, time.perf_counter() - t0
