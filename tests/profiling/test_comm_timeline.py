"""--timeline shows every recipe's communication on every rank, measured at completion
(parallel/primitives/comm_spans.py), and `wb profile analyze` reads it (profiling/analyze.py). One 2-rank launch
trains every run below; hogwild and async-ps refuse --timeline in one line (tests/parallel/loop/test_cli_errors.py),
tp has its own spans (tests/parallel/primitives/test_tensor_parallel.py), and the pipeline its send/recv
(tests/parallel/primitives/test_pipeline.py)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from tests.helpers.runs import TINY, runnable, skip_unless_runnable, torchrun, wb

STEPS = ["steps=4", "progress=false", "checkpoint.every=0", "global_batch=8", "micro_batch=4",
         "profiling.timeline=true"]
RUNS = {   # name: overrides; the collectives each must show on the "comm" lane (the loss all-reduce aside)
    "ddp": (["recipe=ddp"], {"allreduce"}),
    # 6 steps: step 0 has no delay (the straggler sleeps a multiple of its previous step), and in step 1 DDP
    # rebuilds its buckets, a broadcast from C++ the timeline cannot see, where rank 0 waits instead
    "ddp-straggler": (["recipe=ddp", "straggler.rank=1", "straggler.factor=5", "steps=6"], {"allreduce"}),
    "zero1": (["recipe=zero1"], {"allreduce", "allgather"}),
    "zero2": (["recipe=zero2"], {"allreduce", "allgather"}),
    "zero3": (["recipe=zero3"], {"allgather", "reduce_scatter"}),
    "fsdp": (["recipe=fsdp"], {"allgather", "reduce_scatter"}),
    "local-sgd": (["recipe=local-sgd", "local_sgd.sync_every=2"], {"allreduce"}),
    "ddp-cp": (["recipe=ddp", "cp.degree=2"], {"allreduce"}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("timeline")
    dirs = {name: root / name for name in RUNS if runnable(RUNS[name][0][0])}   # no ZeRO without DeepSpeed
    torchrun(2, [(TINY, [*STEPS, *RUNS[name][0], f"run_dir={dirs[name]}"]) for name in dirs])
    return dirs


def _spans(run_dir) -> dict[int, list[dict]]:
    """{rank: its complete spans, with "lane" = the thread's name}."""
    trace = json.loads((run_dir / "trace.json").read_text())
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    out = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            out[e["pid"]].append({**e, "lane": lanes[e["pid"], e["tid"]]})
    return out


@pytest.mark.parametrize("name", RUNS)
def test_every_rank_has_its_recipes_collectives_on_the_comm_lane(runs, name):
    skip_unless_runnable(RUNS[name][0][0])
    spans = _spans(runs[name])
    assert sorted(spans) == [0, 1]
    counts = {rank: Counter(s["name"] for s in events if s["lane"] == "comm") for rank, events in spans.items()}
    assert RUNS[name][1] <= set(counts[0]), f"{name}: comm lane holds {dict(counts[0])}"
    assert counts[0] == counts[1], f"{name}: the ranks' collectives differ: {counts}"
    comm = [s for s in spans[0] if s["lane"] == "comm"]
    assert all(s["args"]["bytes"] >= 0 and s["dur"] >= 0 for s in comm)   # (DeepSpeed broadcasts an empty one)
    for kind in RUNS[name][1]:
        assert sum(s["args"]["bytes"] for s in comm if s["name"] == kind) > 0, kind


def test_ddp_allreduce_ends_after_the_last_rank_issued_it(runs):
    """The span runs to completion: no rank's all-reduce can finish before the straggler (rank 1, which sleeps
    4x its compute after each step) has issued it. A span of the issue alone ends tens of ms earlier."""
    spans = _spans(runs["ddp-straggler"])
    reduces = {r: sorted((s for s in spans[r] if s["lane"] == "comm" and s["name"] == "allreduce"),
                         key=lambda s: s["ts"]) for r in spans}
    assert len(reduces[0]) == len(reduces[1]) >= 12   # per step: the gradient bucket, the loss
    for a, b in zip(reduces[0], reduces[1], strict=True):
        last_issue = max(a["ts"], b["ts"])
        for s in (a, b):
            assert s["ts"] + s["dur"] >= last_issue - 1e3, (a, b)   # 1 ms: the clock alignment's error


def test_context_parallel_ring_transfers_are_issue_and_wait_spans(runs):
    spans = _spans(runs["ddp-cp"])
    for events in spans.values():
        counts = Counter(s["name"] for s in events)
        assert counts["cp.issue"] == counts["cp.wait"] > 0
        assert all(s["args"]["bytes"] > 0 for s in events if s["name"] == "cp.issue")


def test_analyze_names_the_straggler_and_its_cost(runs, tmp_path):
    """straggler.rank=1 factor=5: rank 1 is the straggler of steps 2-4 (steps 0 and 1: see RUNS), and rank 0's
    exposed communication grows far beyond the run without a straggler (it waits for rank 1 at every step)."""
    out = tmp_path / "analysis.json"
    done = wb("profile", "analyze", str(runs["ddp-straggler"]), "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "exposed comm" in done.stdout and "straggler" in done.stdout
    slow = json.loads(out.read_text())
    from gpu_workbench.profiling.analyze import analyze_run

    plain = analyze_run(runs["ddp"])
    stragglers = [s["straggler"] for s in slow["steps"]]
    assert len(stragglers) == 5 and stragglers[2:] == [1, 1, 1], stragglers
    exposed = {r: slow["ranks"][str(r)]["exposed_ms"] for r in (0, 1)}
    assert exposed[0] > 3 * plain["ranks"][0]["exposed_ms"] and exposed[0] > 3 * exposed[1]


def _x(rank: int, name: str, ts: float, dur: float, tid: int = 0, **args) -> dict:
    return {"ph": "X", "pid": rank, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}


def test_analyze_counts_overlap_waits_and_idle_exactly():
    """A hand-made trace, in µs. Rank 0, step 0 (period 0-100): fwd 0-30, bwd 30-70 holding an
    allreduce.wait 60-70; a collective in flight 50-80 on the comm lane. So busy = 30 + 30 = 60, comm = 50-80
    = 30, exposed = 60-80 = 20 (50-60 hides behind bwd), idle = 100 - (60 + 20) = 20. Rank 1 computes 0-90
    and its collective 88-92 is exposed for 2: it waited least, so it is the straggler, 18 µs waited for."""
    meta = [{"ph": "M", "name": "thread_name", "pid": r, "tid": t, "args": {"name": n}}
            for r in (0, 1) for t, n in ((0, "main"), (1, "comm"))]
    events = [*meta,
              _x(0, "step", 0, 95, step=0), _x(0, "fwd", 0, 30), _x(0, "bwd", 30, 40),
              _x(0, "allreduce.wait", 60, 10), _x(0, "allreduce", 50, 30, tid=1), _x(0, "step", 100, 10, step=1),
              _x(1, "step", 0, 95, step=0), _x(1, "fwd", 0, 90), _x(1, "allreduce", 88, 4, tid=1),
              _x(1, "step", 100, 10, step=1)]
    from gpu_workbench.profiling.analyze import analyze

    result = analyze({"traceEvents": events})
    ms = 1e-3
    assert result["ranks"][0] == pytest.approx({"step_ms": 100 * ms, "busy_ms": 60 * ms, "comm_ms": 30 * ms,
                                                "exposed_ms": 20 * ms, "idle_ms": 20 * ms})
    assert result["ranks"][1]["exposed_ms"] == pytest.approx(2 * ms)
    assert result["steps"] == [{"step": 0, "straggler": 1, "waited_ms": pytest.approx(18 * ms),
                                "exposed_ms": {0: pytest.approx(20 * ms), 1: pytest.approx(2 * ms)}}]


def test_analyze_without_a_trace_is_one_line(tmp_path):
    done = wb("profile", "analyze", str(tmp_path))
    assert done.returncode == 2
    want = (f"wb: error: {tmp_path}/trace.json: no trace.json; train with --timeline (profiling.timeline=true) "
            "to write one")
    assert done.stderr.strip().splitlines() == [want]


def test_report_breaks_the_step_time_down_per_rank(runs, tmp_path):
    """`wb report` of runs with a timeline: the time-breakdown figure, and its table equal to the analysis."""
    from gpu_workbench.profiling.analyze import analyze_run

    done = wb("report", str(runs["ddp"]), str(runs["ddp-straggler"]), "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "time_breakdown.png").stat().st_size > 0
    text = (tmp_path / "report.md").read_text()
    assert "![time_breakdown.png](time_breakdown.png)" in text
    slow = analyze_run(runs["ddp-straggler"])["ranks"][0]
    row = f"| ddp-straggler | 0 | {slow['step_ms']:.2f} | {slow['busy_ms']:.2f} | {slow['comm_ms']:.2f} |"
    assert row in text
