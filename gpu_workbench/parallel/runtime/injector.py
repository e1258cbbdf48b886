"""Injected faults and stragglers, the same for every loop: the shared train loop, the parameter
server's workers and Hogwild's processes.

- `fault.kill_rank=R fault.at_step=S`: rank (worker) R exits abruptly (os._exit(17), no cleanup) when it
  starts step S, once per run: not after a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0), not in a
  replacement worker, nor after any relaunch that finds `<run_dir>/.fault_fired` (Ray Train restarts its
  workers with no restart count).
- `fault.hang_rank=R fault.at_step=S`: rank R sleeps forever at step S, as a stuck worker would.
- `straggler.rank=R straggler.factor=F`: rank R sleeps (F - 1) x its own compute time each step.
- `fault.nan_at_step=S`: the gradient of step S turns NaN on every rank, once per process (a rolled-back
  run replays step S with a clean gradient), to exercise the nan_policy.
- `fault.overflow_at_step=S` (precision=fp16): the gradient of step S holds an inf on every rank, once per
  process, to exercise the loss scaler (the step skipped, the scale halved).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from gpu_workbench.profiling import range as prange

MARKER = ".fault_fired"
KILL_EXIT_CODE = 17


class FaultInjector:
    def __init__(self, cfg, rank: int, run_dir: Path | None = None, replacement: bool = False):
        self.fault, self.straggler, self.rank = cfg.fault, cfg.straggler, rank
        self.marker = Path(run_dir) / MARKER if run_dir is not None else None
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        self.fired = replacement or restarted or (self.marker is not None and self.marker.exists())
        self.poisoned = self.overflowed = False

    def before_step(self, step: int) -> None:
        """Fire an injected kill or hang if this rank and step ask for it."""
        f = self.fault
        if f.kill_rank == self.rank and f.at_step == step and not self.fired:
            if self.marker is not None:
                self.marker.parent.mkdir(parents=True, exist_ok=True)
                self.marker.write_text(f"rank {self.rank} killed at step {step}\n")
            if f.kill_host and "TORCHELASTIC_RUN_ID" in os.environ:   # the torchrun agent is our parent
                os.kill(os.getppid(), signal.SIGKILL)   # no agent left to restart us or to leave the rendezvous
            os._exit(KILL_EXIT_CODE)   # an abrupt death, as a killed worker: no cleanup, no checkpoint
        if f.hang_rank == self.rank and f.at_step == step:
            from gpu_workbench.parallel.runtime import flight_recorder as recorder

            recorder.dump(f"injected hang (fault.hang_rank) at step {step}")
            while True:    # a stuck worker: alive, never reaching the next collective
                time.sleep(3600)

    def poisons(self, step: int) -> bool:
        """True once, at fault.nan_at_step: the caller turns this step's gradient NaN."""
        if self.fault.nan_at_step == step and not self.poisoned:
            self.poisoned = True
            return True
        return False

    def overflows(self, step: int) -> bool:
        """True once, at fault.overflow_at_step: the caller puts an inf into this step's gradient."""
        if self.fault.overflow_at_step == step and not self.overflowed:
            self.overflowed = True
            return True
        return False

    def straggle(self, compute_s: float) -> float:
        """Sleep (factor - 1) x compute_s on the straggler rank; returns the seconds slept."""
        s = self.straggler
        if s.rank != self.rank or s.factor <= 1:
            return 0.0
        delay = (s.factor - 1) * compute_s
        with prange("straggle"):   # emulated slow compute (profiling/analyze.py counts it as busy)
            time.sleep(delay)
        return delay
