"""What the training loop calls once per step so that every profiler sees the same steps.

`ProfileSession.from_env(run_dir, rank, timeline=...)` reads what the `wb profile` commands set:
  WB_PROFILE_STEPS=A:B    cudaProfilerStart before step A, cudaProfilerStop after step B
                          (nsys -c cudaProfilerApi captures just those steps);
  WB_TORCH_PROFILE=W,U,A  torch.profiler with schedule(wait=W, warmup=U, active=A), per-rank traces
                          (with distributedInfo, as Holistic Trace Analysis reads) under
                          <run_dir>/torch_profile/, a key_averages table, and on CUDA a memory snapshot.
With none of these and no timeline, every call is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpu_workbench.profiling import timeline
from gpu_workbench.profiling.errors import UsageError


def parse_steps(text: str) -> tuple[int, int]:
    try:
        first, last = (int(p) for p in text.split(":"))
    except ValueError:
        raise UsageError(f"--steps={text!r} must be FIRST:LAST, e.g. 3:5") from None
    if first < 0 or last < first:
        raise UsageError(f"--steps={text!r} must satisfy 0 <= FIRST <= LAST")
    return first, last


def parse_schedule(text: str) -> tuple[int, int, int]:
    try:
        wait, warmup, active = (int(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"WB_TORCH_PROFILE={text!r} must be WAIT,WARMUP,ACTIVE") from None
    if min(wait, warmup) < 0 or active < 1:
        raise UsageError(f"WB_TORCH_PROFILE={text!r}: wait and warmup >= 0, active >= 1")
    return wait, warmup, active


class ProfileSession:
    def __init__(self, run_dir: str | Path, rank: int = 0, *, use_timeline: bool = False,
                 steps: tuple[int, int] | None = None, torch_schedule: tuple[int, int, int] | None = None):
        self.run_dir, self.rank = Path(run_dir), rank
        self.steps = steps
        self._capturing = False
        self._torch = None
        self.torch_out = self.run_dir / "torch_profile"
        if use_timeline:
            timeline.start(self.run_dir / "timeline", rank)
            timeline.align_clocks()
        if torch_schedule:
            self._torch = self._start_torch_profiler(*torch_schedule)

    @classmethod
    def from_env(cls, run_dir, rank: int = 0, use_timeline: bool = False) -> ProfileSession:
        """What `wb profile` set: WB_PROFILE_STEPS (Nsight's capture range), WB_TORCH_PROFILE (the torch
        profiler's schedule), WB_TORCH_PROFILE_RANKS (the ranks it profiles; all without it) and
        WB_TORCH_PROFILE_OUT (where its files go; <run dir>/torch_profile without it)."""
        steps = os.environ.get("WB_PROFILE_STEPS")
        schedule = os.environ.get("WB_TORCH_PROFILE")
        ranks = os.environ.get("WB_TORCH_PROFILE_RANKS")
        if ranks and rank not in {int(r) for r in ranks.split(",")}:
            schedule = None
        session = cls(run_dir, rank, use_timeline=use_timeline, steps=parse_steps(steps) if steps else None,
                      torch_schedule=None)
        session.torch_out = Path(os.environ.get("WB_TORCH_PROFILE_OUT") or session.run_dir / "torch_profile")
        if schedule:
            session._torch = session._start_torch_profiler(*parse_schedule(schedule))
        return session

    def _start_torch_profiler(self, wait: int, warmup: int, active: int):
        import torch

        out = self.torch_out
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        write_trace = torch.profiler.tensorboard_trace_handler(str(out), worker_name=f"rank{self.rank}")

        def on_trace_ready(prof) -> None:
            # With a schedule, results exist only here, once the active steps are done. repeat=1: one
            # cycle, so a longer run still gives one trace per rank (not a cycle per wait+warmup+active steps).
            write_trace(prof)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            (out / f"key_averages-rank{self.rank}.txt").write_text(table)

        prof = torch.profiler.profile(
            activities=activities, schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=on_trace_ready, record_shapes=True, profile_memory=True)
        prof.start()
        return prof

    def begin_step(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self._capturing:
            self._capturing = _cuda_profiler("start")

    def end_step(self, step: int) -> None:
        if self._torch is not None:
            self._torch.step()
        if self._capturing and step >= self.steps[1]:
            _cuda_profiler("stop")
            self._capturing = False

    def close(self) -> None:
        if self._capturing:
            _cuda_profiler("stop")
            self._capturing = False
        if self._torch is not None:
            self._finish_torch_profiler()
        if timeline.enabled():
            timeline.write()

    def _finish_torch_profiler(self) -> None:
        import torch

        prof, self._torch = self._torch, None
        prof.stop()
        out = self.torch_out
        table = out / f"key_averages-rank{self.rank}.txt"
        if not table.exists():
            out.mkdir(parents=True, exist_ok=True)
            table.write_text("no profiled steps: the run ended before the schedule's active steps\n")
        if torch.cuda.is_available():
            torch.cuda.memory._dump_snapshot(str(out / f"memory_snapshot-rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)


def _cuda_profiler(action: str) -> bool:
    """cudaProfilerStart/Stop where CUDA exists (what `nsys -c cudaProfilerApi` waits for)."""
    import torch

    if not torch.cuda.is_available():
        return False
    (torch.cuda.profiler.start if action == "start" else torch.cuda.profiler.stop)()
    return True
