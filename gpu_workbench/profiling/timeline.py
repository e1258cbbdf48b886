"""Per-process host timeline of profiling ranges, and the merge of every rank's into one Chrome trace.

Each process records complete spans (name, start, end, thread, payload) in memory while the timeline
is on, and writes them to `<dir>/timeline-rank<R>.json`. `merge()` turns those files into one
Chrome/Perfetto `trace.json`: one process per rank, threads kept, timestamps on a common clock
(each rank's offset to rank 0 is measured at start-up by `align_clocks`).

A span may name its own lane instead of the recording thread: the collectives, recorded from issue to
completion by a callback on whatever thread completes them (parallel/primitives/comm_spans.py), go to lane "comm",
a thread of its own in the trace after the real threads.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path

from gpu_workbench.profiling.errors import UsageError

_spans: list[tuple] = []
_lock = threading.Lock()
_state = {"on": False, "dir": None, "rank": 0, "offset_ns": 0}


def enabled() -> bool:
    return _state["on"]


def start(directory: str | os.PathLike, rank: int = 0) -> None:
    """Begin recording spans; they go to `<directory>/timeline-rank<rank>.json` on `write()`."""
    with _lock:
        _spans.clear()
        _state.update(on=True, dir=Path(directory), rank=int(rank), offset_ns=0)


def stop() -> None:
    _state["on"] = False


def record(name: str, start_ns: int, end_ns: int, args: dict | None = None, lane: str | None = None) -> None:
    """One finished span, times from time.perf_counter_ns(); on the calling thread, or on `lane`."""
    with _lock:
        _spans.append((name, start_ns, end_ns, lane or threading.get_ident(), args))


def clock_offset_ns(rounds: int = 5) -> int:
    """ns to add to this rank's perf_counter_ns to read rank 0's (0 outside a process group).

    After a barrier every rank reads its clock at (nearly) the same instant; rank 0's reading minus
    ours is the offset. The median of a few rounds discards a slow wake-up. Collective.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    offsets = []
    for _ in range(rounds):
        dist.barrier()
        now = torch.tensor([time.perf_counter_ns()], dtype=torch.int64)
        ref = now.clone()
        dist.broadcast(ref, src=0)
        offsets.append(int(ref.item() - now.item()))
    return int(statistics.median(offsets))


def align_clocks(rounds: int = 5) -> int:
    """Measure and keep this rank's offset to rank 0, applied when the timelines are merged. Its own
    collectives are not recorded: they are the measurement, not the run's communication."""
    on, _state["on"] = _state["on"], False
    try:
        _state["offset_ns"] = clock_offset_ns(rounds)
    finally:
        _state["on"] = on
    return _state["offset_ns"]


def write() -> Path | None:
    """Write this process's spans (and stop recording). Returns the file written, if any."""
    if _state["dir"] is None:
        return None
    stop()
    path = Path(_state["dir"]) / f"timeline-rank{_state['rank']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        spans = [{"name": n, "start_ns": s, "end_ns": e, "tid": t, "args": a or {}} for n, s, e, t, a in _spans]
    payload = {"rank": _state["rank"], "pid": os.getpid(), "offset_ns": _state["offset_ns"], "spans": spans}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)
    return path


def _thread_indices(spans: list[dict]) -> dict:
    """{recorded tid or lane name: trace thread index}: real threads in order of first span (the main thread,
    which records the first range, is 0), then the named lanes."""
    tids = list(dict.fromkeys(s["tid"] for s in spans))
    ordered = [t for t in tids if not isinstance(t, str)] + sorted(t for t in tids if isinstance(t, str))
    return {tid: i for i, tid in enumerate(ordered)}


def merge(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Merge every `timeline-rank*.json` under `directory` into a Chrome trace at `out`."""
    files = sorted(Path(directory).glob("timeline-rank*.json"))
    if not files:
        raise UsageError(f"no timeline-rank*.json files in {directory}")
    ranks = [json.loads(f.read_text()) for f in files]
    origin = min((s["start_ns"] + r["offset_ns"] for r in ranks for s in r["spans"]), default=0)
    events = []
    for r in ranks:
        rank = r["rank"]
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        threads = _thread_indices(r["spans"])
        for tid, index in threads.items():
            name = tid if isinstance(tid, str) else "main" if index == 0 else f"thread {index}"
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": index, "args": {"name": name}})
        for s in sorted(r["spans"], key=lambda s: (s["start_ns"], -s["end_ns"])):
            events.append({"name": s["name"], "ph": "X", "pid": rank, "tid": threads[s["tid"]],
                           "ts": (s["start_ns"] + r["offset_ns"] - origin) / 1e3,
                           "dur": (s["end_ns"] - s["start_ns"]) / 1e3, "args": s["args"]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return out
