"""Every collective on the host timeline, from issue to completion (docs/ARCHITECTURE.md, Profiling).

A range around `dist.all_reduce(..., async_op=True)` measures the launch, not the collective: DDP's bucket
hook returns at once and the reduction finishes later, inside backward. So while the timeline is on, the
collectives that the recipes and their engines (DDP, FSDP2, DeepSpeed, local-sgd) call through
`torch.distributed` are wrapped: each becomes a span on the rank's "comm" lane that starts when the rank
issues it and ends when its work completes (a callback on the work's future; on return for a blocking call),
so no rank's span can end before the last rank issued the collective. Its args: the bytes this rank hands
in, and whether the call was async. Point-to-point transfers have no future on gloo; their code records
its own wait spans (context parallelism's `cp.wait`, the pipeline's send/recv).

`install()` rebinds the public functions of `torch.distributed` (never distributed_c10d's, which torch
calls internally, so nothing is counted twice). It runs before the engine is built, because DeepSpeed keeps
references to the functions it will call. The wrappers cost one flag check while the timeline is off.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist

from gpu_workbench.profiling import timeline

LANE = "comm"
# torch.distributed's name -> the span's name (the project's range names, profiling/ranges.py KINDS)
COLLECTIVES = {
    "all_reduce": "allreduce", "all_reduce_coalesced": "allreduce",
    "all_gather": "allgather", "all_gather_into_tensor": "allgather", "all_gather_single": "allgather",
    "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter", "broadcast": "broadcast", "all_to_all_single": "alltoall",
}
_installed: dict[str, object] = {}   # name -> the original function


def _nbytes(args, kwargs) -> int:
    """The bytes of the tensors handed in (an output buffer included: it is what moves on the wire)."""
    total = 0
    for value in (*args, *kwargs.values()):
        tensors = value if isinstance(value, (list, tuple)) else (value,)
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def _future(work):
    """The work's future; None for a blocking call, and for a work without one (it is waited on at once
    by its caller or not at all: recorded on return, with "async" 1 saying the end is the issue's)."""
    if work is None:
        return None
    try:
        return work.get_future()
    except RuntimeError:   # "Work::getFuture not implemented" (some backends' works)
        return None


def _traced(fn, span_name: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not timeline.enabled():
            return fn(*args, **kwargs)
        payload = {"bytes": _nbytes(args, kwargs), "async": int(bool(kwargs.get("async_op")))}
        began = time.perf_counter_ns()
        work = fn(*args, **kwargs)
        future = _future(work)
        if future is None:   # a blocking call: complete on return
            timeline.record(span_name, began, time.perf_counter_ns(), payload, lane=LANE)
        else:
            future.then(lambda _: timeline.record(span_name, began, time.perf_counter_ns(), payload, lane=LANE))
        return work

    wrapper.__wrapped_collective__ = True
    return wrapper


def install() -> None:
    """Wrap torch.distributed's collectives (idempotent; every one this torch has)."""
    for name, span_name in COLLECTIVES.items():
        fn = getattr(dist, name, None)
        if fn is None or getattr(fn, "__wrapped_collective__", False):
            continue
        _installed[name] = fn
        setattr(dist, name, _traced(fn, span_name))
