"""`range(name, **payload)` and `mark(name)`: one annotation for every listener.

A range (1) pushes/pops an NVTX range in domain "wb" with a category and colour per kind of work
and an integer payload, when an NVTX tool is attached (Nsight sets NVTX_INJECTION64_PATH);
(2) records the span in the host timeline when it is on; (3) opens
`torch.profiler.record_function` when a torch profiler is running (under the name alone, so its tables
group a range over micro-batches and steps; the payload is kept by NVTX and the timeline). With nothing
listening it does three flag checks and nothing else. `NVTX_DISABLE=1` or `WB_PROFILING=0` turn NVTX off.
"""

from __future__ import annotations

import functools
import os
import sys
import time

from gpu_workbench.profiling import timeline

DOMAIN = "wb"
# Category and colour by kind of work, so Nsight can filter and colour a timeline at a glance.
KINDS = {
    "step": ("step", 0x4C72B0), "data": ("data", 0x937860), "fwd": ("compute", 0x55A868),
    "bwd": ("compute", 0xC44E52), "optimizer": ("optimizer", 0x8172B2), "checkpoint": ("io", 0xCCB974),
    "allreduce": ("comm", 0x64B5CD), "reduce_scatter": ("comm", 0x64B5CD), "allgather": ("comm", 0x64B5CD),
    "send": ("comm", 0x64B5CD), "recv": ("comm", 0x64B5CD), "push": ("comm", 0x64B5CD),
    "pull": ("comm", 0x64B5CD), "broadcast": ("comm", 0x64B5CD),
    "alltoall": ("comm", 0x64B5CD), "kernel": ("kernel", 0xDD8452),
}
_CATEGORY_IDS = {cat: i + 1 for i, cat in enumerate(dict.fromkeys(c for c, _ in KINDS.values()))}
_CATEGORY_IDS["other"] = len(_CATEGORY_IDS) + 1


def _nvtx_listening() -> bool:
    if os.environ.get("WB_PROFILING", "1") == "0" or os.environ.get("NVTX_DISABLE"):
        return False
    return bool(os.environ.get("NVTX_INJECTION64_PATH") or os.environ.get("NVTX_INJECTION32_PATH"))


class _Nvtx:
    """Cached NVTX domain and event attributes (creating attributes per call costs microseconds)."""

    def __init__(self):
        self.on = False
        self.domain = None
        self._attrs: dict = {}

    def refresh(self) -> None:
        self.on = _nvtx_listening()
        if self.on and self.domain is None:
            try:
                import nvtx
            except ImportError:  # GPU images without the nvtx package: no NVTX, the rest still works
                self.on = False
                return
            self.domain = nvtx.get_domain(DOMAIN)

    def attributes(self, name: str, payload: int | None):
        key = (name, payload)
        attrs = self._attrs.get(key)
        if attrs is None:
            category, color = KINDS.get(name.split(":")[0].split(".")[0], ("other", 0x999999))   # allreduce.issue
            attrs = self.domain.get_event_attributes(message=name, color=color,
                                                     category=_CATEGORY_IDS[category], payload=payload)
            if len(self._attrs) < 4096:  # payloads are small integers; bound the cache all the same
                self._attrs[key] = attrs
        return attrs


_nvtx = _Nvtx()
_nvtx.refresh()


def refresh_listeners() -> None:
    """Re-read the environment (after NVTX_INJECTION64_PATH or WB_PROFILING changed in-process)."""
    _nvtx.refresh()


class range:  # noqa: N801  (named like the builtin on purpose: `with prange("fwd", mb=3):`)
    """Context manager and decorator: `with range("fwd", mb=3, stage=1): ...`."""

    __slots__ = ("name", "payload", "_t0", "_rf", "_pushed")

    def __init__(self, name: str, **payload: int):
        self.name = name
        self.payload = payload

    def __enter__(self):
        self._pushed = _nvtx.on
        if self._pushed:
            value = next(iter(self.payload.values()), None)
            _nvtx.domain.push_range(_nvtx.attributes(self.name, value))
        self._rf = None
        # torch.profiler can be on only where torch is imported; importing it here would cost the CLI seconds
        torch_profiler = sys.modules.get("torch.autograd.profiler")
        if torch_profiler is not None and torch_profiler._is_profiler_enabled:
            # the name alone, so key_averages groups every "optimizer" step in one row; the payload rides along
            args = " ".join(f"{k}={v}" for k, v in self.payload.items()) or None
            self._rf = torch_profiler.record_function(self.name, args)
            self._rf.__enter__()
        self._t0 = time.perf_counter_ns() if timeline.enabled() else None
        return self

    def __exit__(self, *exc):
        if self._t0 is not None:
            timeline.record(self.name, self._t0, time.perf_counter_ns(), self.payload)
        if self._rf is not None:
            self._rf.__exit__(*exc)
        if self._pushed:
            _nvtx.domain.pop_range()
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with range(self.name, **self.payload):
                return fn(*args, **kwargs)

        return wrapper


def listening() -> bool:
    """Whether a range would reach anyone now (an NVTX tool, the host timeline, a torch profiler), so a
    caller can skip the work of producing fine-grained ranges nobody records."""
    torch_profiler = sys.modules.get("torch.autograd.profiler")
    return _nvtx.on or timeline.enabled() or bool(torch_profiler is not None and torch_profiler._is_profiler_enabled)


def mark(name: str, **payload: int) -> None:
    """An instantaneous event (NVTX mark; a zero-length span on the timeline)."""
    if _nvtx.on:
        _nvtx.domain.mark(_nvtx.attributes(name, next(iter(payload.values()), None)))
    if timeline.enabled():
        now = time.perf_counter_ns()
        timeline.record(name, now, now, payload)
