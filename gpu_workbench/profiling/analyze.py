"""Where each rank's step time goes, from a run's host timeline (`trace.json`, profiling/timeline.py).

Per rank and step, over the step's period on that rank (from its "step" span's start to the next one's: the
loop's loss all-reduce and a straggler's delay come after the span and belong to the step; the last step,
with no successor, is left out):
  busy      compute ranges on the main thread (fwd, bwd, bwd_weight, optimizer, straggle), less the waits
            inside them
  comm      communication in flight: the "comm" lane's collectives (issue to completion,
            parallel/primitives/comm_spans.py) and the wait ranges (`*.wait`, the pipeline's send/recv)
  exposed   comm while the rank is not busy: communication no computation hides
  idle      the rest of the step (data loading, bookkeeping, waiting on nothing recorded)
A synchronous step waits for its slowest rank, so the straggler of a step is the rank that waited least
(the smallest exposed time), and `waited_ms` is how long the others waited for it at most.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from gpu_workbench.profiling.errors import UsageError

# "straggle": straggler.rank's emulated slow compute (parallel/runtime/injector.py)
COMPUTE = frozenset({"fwd", "bwd", "bwd_weight", "optimizer", "straggle"})
WAITS = frozenset({"send", "recv"})   # and every name ending in ".wait"
COMM_LANE = "comm"


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _minus(keep: list[tuple[float, float]], cut: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of the (disjoint, sorted) `keep` intervals outside the (disjoint, sorted) `cut` ones."""
    out = []
    for a, b in keep:
        for c, d in cut:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


def _clip(spans, start: float, end: float) -> list[tuple[float, float]]:
    return [(max(s, start), min(e, end)) for s, e in spans if e > start and s < end]


def _is_wait(name: str) -> bool:
    return name in WAITS or name.endswith(".wait")


def _rank_events(trace: dict) -> dict[int, dict]:
    """{rank: {"steps": [(step, start, end)], "compute": [...], "waits": [...], "comm": [...]}} in µs."""
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    ranks: dict[int, dict] = {}
    for e in trace["traceEvents"]:
        if e["ph"] != "X":
            continue
        r = ranks.setdefault(e["pid"], {"steps": [], "compute": [], "waits": [], "comm": []})
        span = (e["ts"], e["ts"] + e["dur"])
        if lanes.get((e["pid"], e["tid"])) == COMM_LANE:
            r["comm"].append(span)
        elif e["name"] == "step" and e["tid"] == 0:
            r["steps"].append((e["args"].get("step"), *span))
        elif _is_wait(e["name"]):
            r["waits"].append(span)
        elif e["name"] in COMPUTE and e["tid"] == 0:
            r["compute"].append(span)
    return ranks


def _step_breakdown(r: dict, start: float, end: float) -> dict:
    waits = _union(_clip(r["waits"], start, end))
    busy = _minus(_union(_clip(r["compute"], start, end)), waits)
    comm = _union(_clip(r["comm"], start, end) + waits)
    ms = 1e-3
    return {"step_ms": (end - start) * ms, "busy_ms": _length(busy) * ms, "comm_ms": _length(comm) * ms,
            "exposed_ms": _length(_minus(comm, busy)) * ms,
            "idle_ms": ((end - start) - _length(_union(busy + comm))) * ms}


def analyze(trace: dict) -> dict:
    """{"ranks": {rank: medians over steps of step/busy/comm/exposed/idle ms}, "steps": [{"step",
    "straggler", "waited_ms", "exposed_ms": {rank: ms}}]}; steps every rank recorded."""
    ranks = _rank_events(trace)
    per_step: dict[int, dict[int, dict]] = {}
    for rank, r in ranks.items():
        periods = sorted(r["steps"], key=lambda s: s[1])
        for (step, start, _), (_, following, _) in zip(periods, periods[1:], strict=False):
            per_step.setdefault(step, {})[rank] = _step_breakdown(r, start, following)
    complete = {s: by_rank for s, by_rank in sorted(per_step.items()) if len(by_rank) == len(ranks)}
    if not complete:
        raise UsageError("the trace holds no step with a successor that every rank recorded (train at least 2 "
                         "steps with --timeline)")
    keys = ("step_ms", "busy_ms", "comm_ms", "exposed_ms", "idle_ms")
    summary = {rank: {k: statistics.median(complete[s][rank][k] for s in complete) for k in keys}
               for rank in sorted(ranks)}
    steps = []
    for s, by_rank in complete.items():
        exposed = {rank: by_rank[rank]["exposed_ms"] for rank in sorted(by_rank)}
        straggler = min(exposed, key=exposed.get)
        steps.append({"step": s, "straggler": straggler, "waited_ms": max(exposed.values()) - exposed[straggler],
                      "exposed_ms": exposed})
    return {"ranks": summary, "steps": steps}


def analyze_run(run_dir: str | Path) -> dict:
    """analyze() of `<run_dir>/trace.json`."""
    path = Path(run_dir) / "trace.json"
    if not path.is_file():
        raise UsageError(f"{path}: no trace.json; train with --timeline (profiling.timeline=true) to write one")
    return analyze(json.loads(path.read_text()))
