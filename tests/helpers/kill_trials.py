"""SIGKILL `wb train` at random moments while it saves checkpoints, resume it, and compare with an
uninterrupted run. Used by tests/parallel/checkpoint/test_kill_during_save.py (a few trials) and by
scripts/kill_during_save.py (20 or more, with a table).

Half the trials kill the process as soon as a checkpoint's `.tmp` directory appears (mid-save), half
at a random moment of the run. A trial passes when every complete-looking checkpoint left behind
verifies (manifest, sizes, checksums, loads) and the resumed run ends bit-identical to the reference:
the same final parameters and the same loss at every step.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_workbench.parallel.checkpoint import complete_checkpoints, verify
from gpu_workbench.parallel.runtime.rundir import read_metrics
from tests.helpers.cli import ROOT, env

ARGS = ["train", "--config", str(ROOT / "configs" / "tiny.toml"), "progress=false", "steps=10", "model.d_model=32",
        "model.n_layers=1", "checkpoint.every=1", "checkpoint.keep=2", "checkpoint.save_final=true"]


@dataclass
class Trial:
    mode: str              # "mid-save" or "random"
    killed_at_s: float     # seconds after start (None: finished before the kill)
    saw_tmp: bool          # a .tmp checkpoint existed when the kill landed
    damaged_left: list[str]   # complete-looking checkpoints that fail verification (must be empty)
    identical: bool        # resumed run == reference, bit for bit


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpu_workbench", *ARGS, f"run_dir={run_dir}"], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill(proc: subprocess.Popen, run_dir: Path, mode: str, rng: random.Random, timeout: float) -> tuple[float, bool]:
    t0, ckpts = time.time(), run_dir / "checkpoints"
    delay = rng.uniform(2.0, 6.0)   # "random": somewhere in the run (start-up included)
    while proc.poll() is None and time.time() - t0 < timeout:
        tmp = ckpts.is_dir() and any(p.name.endswith(".tmp") for p in ckpts.iterdir())
        if (mode == "mid-save" and tmp and rng.random() < 0.5) or (mode == "random" and time.time() - t0 > delay):
            proc.kill()
            proc.wait()
            return time.time() - t0, bool(tmp)
        time.sleep(0.002)
    proc.wait()
    return None, False


def run_trial(root: Path, reference: Path, mode: str, rng: random.Random, timeout: float = 120) -> Trial:
    run_dir = root / f"{mode}-{rng.randrange(10**9)}"
    killed_at, saw_tmp = _kill(_start(run_dir), run_dir, mode, rng, timeout)
    damaged = [str(p) for p in complete_checkpoints(run_dir) if verify(p) is not None]
    done = subprocess.run([sys.executable, "-m", "gpu_workbench", *ARGS, f"run_dir={run_dir}"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    identical = done.returncode == 0 and _same(run_dir, reference)
    return Trial(mode, killed_at, saw_tmp, damaged, identical)


def reference_run(root: Path) -> Path:
    run_dir = root / "reference"
    subprocess.run([sys.executable, "-m", "gpu_workbench", *ARGS, f"run_dir={run_dir}"], cwd=ROOT, env=env(),
                   check=True, capture_output=True, timeout=300)
    return run_dir


def _same(a: Path, b: Path) -> bool:
    pa, pb = (torch.load(d / "final_model.pt", weights_only=True) for d in (a, b))
    same_params = pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    return same_params and [m["loss"] for m in read_metrics(a)] == [m["loss"] for m in read_metrics(b)]
