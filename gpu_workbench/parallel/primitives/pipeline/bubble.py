"""The measured pipeline bubble, from the spans every stage-rank recorded (parallel.pipeline.stages).

A span is (kind, micro-batch, stage, start_ns, end_ns, cpu_ns): kind F / B / W is compute, S / R a
wait on a send / receive. For one step of one data-parallel replica:

    window      first compute start .. last compute end, over the replica's stage-ranks
    bubble      1 - mean over ranks of (compute time) / window      (the simulator's definition)
    stolen      share of the compute spans' wall time the thread was not on a CPU (wall - cpu_ns)

On a shared CPU another process can take a core from a rank at any moment (mid-span, or between
spans); the others then wait, and that shows up as extra bubble that is no property of the schedule.
Such noise only ever adds idle time, so, as `timeit` reports the fastest run, the reported bubble is
the smallest over the kept steps (the first, shape-inferring, step left out), the median and every
step's value beside it, with each step's stolen share as the diagnosis (seen on a 2-core box under a
load of ~6: steps at 0.16-0.49 where the prediction was 0.11; unloaded, all steps within ~0.05).
Stage costs for the prediction are medians of CPU time on a CPU device (undisturbed compute) and of
wall time on a GPU.
"""

from __future__ import annotations

import statistics

Span = tuple[str, int, int, int, int, int]


def step_bubble(spans_by_rank: dict[int, list[Span]]) -> tuple[float, float]:
    """(bubble, stolen) of one step of one replica."""
    compute = {r: [s for s in spans if s[0] in "FBW"] for r, spans in spans_by_rank.items()}
    t0 = min(s[3] for spans in compute.values() for s in spans)
    t1 = max(s[4] for spans in compute.values() for s in spans)
    busy = statistics.mean(sum(s[4] - s[3] for s in spans) for spans in compute.values())
    wall = sum(s[4] - s[3] for spans in compute.values() for s in spans)
    stolen = sum(max(0, s[4] - s[3] - s[5]) for spans in compute.values() for s in spans) / wall if wall else 0.0
    return 1.0 - busy / (t1 - t0), stolen


def measure(history: dict[tuple[int, int], list[list[Span]]], cpu_costs: bool, n_stages: int) -> dict:
    """history[(stage-rank, replica)] = that rank's spans per kept step. Returns the smallest bubble over
    steps and replicas, the median, the per-step values, that step's spans (for the Gantt chart) and the
    median cost (ms) of F, B and W per virtual stage."""
    replicas = sorted({d for _, d in history})
    n_steps = min(len(h) for h in history.values())
    first = 1 if n_steps > 1 else 0
    per_step = []   # (bubble, stolen, replica, step)
    for d in replicas:
        for k in range(first, n_steps):
            bubble, stolen = step_bubble({r: h[k] for (r, dd), h in history.items() if dd == d})
            per_step.append((bubble, stolen, d, k))
    best = min(per_step)
    spans = {r: h[best[3]] for (r, d), h in history.items() if d == best[2]}
    costs = {}
    for kind in "FBW":
        costs[kind] = []
        for stage in range(n_stages):
            values = [(s[5] if cpu_costs else s[4] - s[3]) / 1e6 for h in history.values() for step in h[first:]
                      for s in step if s[0] == kind and s[2] == stage]
            costs[kind].append(statistics.median(values) if values else 0.0)
    return {"bubble": best[0], "stolen": best[1], "median": statistics.median(b for b, *_ in per_step),
            "by_step": [round(b, 4) for b, *_ in per_step], "stolen_by_step": [round(s, 4) for _, s, *_ in per_step],
            "spans": spans, "costs": costs}
