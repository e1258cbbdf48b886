"""Each rank's ring buffer of its last collectives and point-to-point operations, and its dump
(docs/ARCHITECTURE.md, Flight recorder; `wb debug hang` reads the dumps: tools/flight_analysis.py).

    flight.start(run_dir, rank, world_size, size=cfg.fault.flight_records)   # the train loop, at setup
    flight.record(...)        # parallel/comm_spans.py's wrapper, for every torch.distributed collective
    flight.dump("collective timeout")                     # -> <run_dir>/flight/rank<R>.json

An entry: seq (per process group, so the ranks' entries line up: every rank makes the same groups in the
same order and issues a group's collectives in the same order), op, the group's name and ranks, the shapes,
dtype and bytes handed in, the state (issued, completed, or timed out: still issued at a dump after a
timeout), the times (wall clock, comparable across the ranks of one machine), the training step, and the
call site: the innermost frame outside torch and this wrapper (the project's, or the user's, code) and the
innermost torch frame (which of torch's machinery issued it: FSDP2, DDP's reducer, DTensor, the pipeline).

Dumps are written on a collective timeout or any error in the loop, when an injected hang starts, on
SIGUSR1, on SIGTERM (torchrun stopping the other ranks after one failed), and when `wb debug dump RUN_DIR`
asks (a request file a watcher thread reads: a rank blocked in
a C++ collective runs no Python signal handler until it returns).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

FOLDER = "flight"
REQUEST = "dump_request"
_TORCH_DIR = os.path.dirname(torch.__file__)
# the wrappers that call record(): not the call site (comm_spans' collectives, the pipeline's batched p2p)
_PRIMITIVES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "primitives")
_HERE = {os.path.abspath(__file__)} | {os.path.abspath(os.path.join(_PRIMITIVES, name))
                                       for name in ("comm_spans.py", os.path.join("pipeline", "stages.py"))}


class _State:
    def __init__(self) -> None:
        self.entries: collections.deque | None = None   # None: the recorder is off
        self.seq: dict[str, int] = {}
        self.run_dir: Path | None = None
        self.rank, self.world_size, self.step = 0, 1, -1
        self.skip: tuple[int, int] | None = None   # (rank, step): fault.skip_collective_at_step
        self.lock = threading.Lock()
        self.log = None   # write-through: every entry and completion appended to rank<R>.jsonl at once


_state = _State()


def enabled() -> bool:
    return _state.entries is not None


def start(run_dir: Path, rank: int, world_size: int, size: int, skip: tuple[int, int] | None = None,
          write_through: bool = False) -> None:
    """Turn the recorder on for this rank (size 0: off); SIGUSR1 and dump requests dump it. `write_through`:
    also append every entry to rank<R>.jsonl as it happens, for a rank that dies inside a C++ library (gloo
    aborts the process on a size mismatch) and so writes no dump."""
    if size <= 0:
        return
    _state.entries = collections.deque(maxlen=size)
    _state.run_dir, _state.rank, _state.world_size, _state.skip = Path(run_dir), rank, world_size, skip
    folder = _state.run_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    _state.log = open(folder / f"rank{rank}.jsonl", "w") if write_through else None   # noqa: SIM115
    (folder / f"rank{rank}.pid").write_text(str(os.getpid()))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda *_: dump("SIGUSR1"))
        _on_terminate(signal.getsignal(signal.SIGTERM))
    threading.Thread(target=_watch, args=(folder / REQUEST,), daemon=True, name="wb-flight").start()


def _on_terminate(previous) -> None:
    """SIGTERM (torchrun stopping the other ranks when one failed): dump first, then what SIGTERM did before."""
    def handler(signum, frame):
        dump("SIGTERM: the launcher stopped this rank (another rank failed)")
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


def stop() -> None:
    _state.entries = None


def set_step(step: int) -> None:
    _state.step = step


def skips_now(blocking: bool) -> bool:
    """fault.skip_collective_at_step: this rank's first blocking collective of that step is not issued (a desync
    on purpose), once."""
    if _state.skip is None or not blocking or _state.skip != (_state.rank, _state.step):
        return False
    _state.skip = None
    return True


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_PLUMBING = ("distributed_c10d.py", "c10d_logger.py", "_functional_collectives")   # torch's own wrappers


def _call_sites() -> tuple[str, str]:
    """(the innermost frame outside torch and the wrapper, the innermost frame of torch.distributed's machinery
    that issued it: FSDP2, DDP's hooks, DTensor, the pipeline's schedules), as file:line in function."""
    frame, ours, theirs = sys._getframe(2), "", ""
    while frame is not None and not ours:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(_TORCH_DIR):
            inner = os.path.relpath(path, _TORCH_DIR)
            if not theirs and inner.startswith("distributed") and not any(p in inner for p in _PLUMBING):
                theirs = f"torch/{inner}:{frame.f_lineno} in {frame.f_code.co_name}"
        elif path not in _HERE:
            shown = os.path.relpath(path, _ROOT) if path.startswith(_ROOT) else path
            ours = f"{shown}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return ours, theirs


def record(op: str, group, tensors: list[torch.Tensor], peer: int | None = None) -> dict | None:
    """A new entry, state "issued" (None when the recorder is off)."""
    if _state.entries is None:
        return None
    import torch.distributed as dist

    group = group or dist.group.WORLD
    name = getattr(group, "group_name", None) or str(id(group))
    try:
        ranks = dist.get_process_group_ranks(group) if dist.is_initialized() else [0]
    except (ValueError, RuntimeError, AttributeError, TypeError):   # a library's own group object: unnamed ranks
        ranks = []
    if peer is not None:   # one direction of a point-to-point pair: the sender's n-th send is the receiver's n-th recv
        src, dst = (_state.rank, peer) if op == "send" else (peer, _state.rank)
        name, ranks = f"{name}:p2p:{src}->{dst}", [src, dst]
    ours, theirs = _call_sites()
    with _state.lock:
        seq = _state.seq[name] = _state.seq.get(name, -1) + 1
        entry = {"seq": seq, "op": op, "group": name, "ranks": ranks, "peer": peer,
                 "shapes": [list(t.shape) for t in tensors], "dtype": str(tensors[0].dtype) if tensors else None,
                 "bytes": sum(t.numel() * t.element_size() for t in tensors), "state": "issued",
                 "issued_at": time.time(), "completed_at": None, "step": _state.step, "site": ours,
                 "torch_site": theirs}
        _state.entries.append(entry)
        _write_through(entry)
    return entry


def completed(entry: dict | None) -> None:
    if entry is not None:
        entry["state"], entry["completed_at"] = "completed", time.time()
        with _state.lock:
            _write_through({k: entry[k] for k in ("group", "seq", "state", "completed_at")})


def _write_through(line: dict) -> None:
    if _state.log is not None:
        _state.log.write(json.dumps(line) + "\n")
        _state.log.flush()


def dump(reason: str) -> Path | None:
    """Write this rank's entries to <run_dir>/flight/rank<R>.json (atomically); entries still issued are
    marked timed out when the reason is a timeout."""
    if _state.entries is None or _state.run_dir is None:
        return None
    with _state.lock:
        entries = [dict(e) for e in _state.entries]
    if "timed out" in reason or "timeout" in reason.lower():
        for e in entries:
            if e["state"] == "issued":
                e["state"] = "timed out"
    path = _state.run_dir / FOLDER / f"rank{_state.rank}.json"
    body = {"rank": _state.rank, "world_size": _state.world_size, "pid": os.getpid(), "reason": reason,
            "dumped_at": time.time(), "step": _state.step, "entries": entries}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(path)
    return path


def _watch(request: Path) -> None:
    """Dump whenever `wb debug dump` writes a newer request file."""
    seen = request.stat().st_mtime if request.exists() else 0.0
    while _state.entries is not None:
        time.sleep(0.5)
        try:
            mtime = request.stat().st_mtime
        except OSError:
            continue
        if mtime > seen:
            seen = mtime
            dump("wb debug dump")
