"""scripts/gpu_check.sh --dry-run: on a CPU machine it proves the GPU check's imports and calls exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(**env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "/tmp/wb-gpu-dry"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.slow
def test_dry_run_passes_without_deepspeed_ray_nvtx_and_prints_the_commands():
    out = _dry_run()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    for command in ("-m pytest tests/kernels -m gpu", "kernels_cli check all --backend triton",
                    "kernels_cli compile all --arch", "kernels_cli bench all", "scripts/gpu_summary.py"):
        assert command in out.stdout, command
    assert "preflight: 0 problem(s)" in out.stdout and " FAIL " not in out.stdout


@pytest.mark.slow
def test_dry_run_fails_when_something_the_check_needs_is_missing():
    out = _dry_run(WB_PREFLIGHT_BLOCK="typer")
    assert out.returncode != 0
    assert "FAIL import typer" in out.stdout and "preflight: 0 problem(s)" not in out.stdout
