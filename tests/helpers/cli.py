"""The one way tests run the real `wb` CLI: `python -m gpu_workbench ...` in a subprocess.

`wb(*args, timeout=600, env=None, **extra_env)` runs from the repository root with this checkout on
PYTHONPATH, one intra-op thread, the interpreter's bin directory first on PATH (for `torchrun`, `ray`
and the `wb` that commands such as `wb profile ... -- wb train` run), and none of the variables
that would make the child think it is a rank of some outer job. `env` (a dict) and then `extra_env`
(keywords) are applied last, so a caller can override any of these, PATH included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)
# Set by torchrun, Ray and torchelastic in a parent job: a child `wb` must start a job of its own.
OUTER_JOB_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "RAY_ADDRESS", "TORCHELASTIC_RUN_ID")


def env(**extra: str) -> dict[str, str]:
    """The environment `wb()` gives its subprocess (also for torchrun / ray launched directly)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PATH=VENV_BIN + os.pathsep + os.environ["PATH"])
    for key in OUTER_JOB_VARS:
        e.pop(key, None)
    e.update(extra)
    return e


def wb(*args: str, timeout: float = 600, env: dict[str, str] | None = None,
       **extra_env: str) -> subprocess.CompletedProcess:
    """`python -m gpu_workbench *args`, output captured as text; returns the CompletedProcess (no check)."""
    overrides = {**(env or {}), **extra_env}
    return subprocess.run([sys.executable, "-m", "gpu_workbench", *args], cwd=ROOT, env=_env(**overrides),
                          capture_output=True, text=True, timeout=timeout)


_env = env   # `wb`'s `env` parameter shadows the function inside it


def one_line(done: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The one assertion of a one-line answer: exit `code`, stderr exactly one line holding every needle, no
    traceback; a refusal (code 2) is a `wb: error:` line. Returns the line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert code != 2 or lines[0].startswith("wb: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]



WORKERS = ROOT / "tests" / "helpers" / "workers"


def torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The one way tests launch a worker script under `torchrun --standalone` with `nproc` ranks: from the
    repository root, with `wb()`'s environment plus `env`. Asserts it succeeded, with the tails of its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           *args]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done
