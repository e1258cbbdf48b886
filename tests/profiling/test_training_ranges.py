"""A real 2-process `ddp` run under a real NVTX tool, with the timeline on: every rank emits the
expected tree of `wb` ranges, and trace.json holds both ranks' nested spans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.profiling.conftest import NO_NVTX, nesting, read_nvtx_logs

ROOT = Path(__file__).resolve().parents[2]
STEPS, MICRO_BATCHES = 2, 2


@pytest.fixture(scope="module")
def profiled_run(nvtx_recorder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    log = tmp / "nvtx"
    env = {**os.environ, "NVTX_INJECTION64_PATH": str(nvtx_recorder), "WB_NVTX_LOG": str(log),
           "OMP_NUM_THREADS": "1"}
    # global batch 8 = micro 2 x accum 2 x dp 2
    done = subprocess.run([sys.executable, "-m", "gpu_workbench", "train", "--recipe", "ddp", "--nproc", "2",
                           "--config", str(ROOT / "configs" / "tiny.toml"), "--run-dir", str(tmp / "run"),
                           "--timeline", f"steps={STEPS}", "global_batch=8", "micro_batch=2", "progress=false",
                           "checkpoint.every=0"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return read_nvtx_logs(log), tmp / "run"


def test_every_rank_emits_the_range_tree(profiled_run):
    pytest.importorskip("nvtx", reason=NO_NVTX)
    logs, _ = profiled_run
    trees = [nesting(events) for events in logs.values() if any(" wb " in line for line in events)]
    assert len(trees) == 2, f"expected NVTX events from 2 ranks, got {len(trees)}"
    for tree in trees:
        steps = [(d, p) for d, name, p in tree if name == "step"]
        assert steps == [(0, s) for s in range(STEPS)]
        top_level = [(name, p) for d, name, p in tree if d == 1]
        per_step = [("data", 0), ("fwd", 0), ("bwd", 0), ("data", 1), ("fwd", 1), ("bwd", 1), ("optimizer", None)]
        for s in range(STEPS):
            chunk = top_level[s * len(per_step):(s + 1) * len(per_step)]
            assert [n for n, _ in chunk] == [n for n, _ in per_step]
            assert [p for _, p in chunk][:6] == [p for _, p in per_step][:6]   # the micro-batch payloads
            assert chunk[6][1] == s                                            # optimizer carries the step
        # DDP's gradient all-reduce is launched inside the last micro-batch's backward only (no_sync before)
        allreduce_depths = {d for d, name, _ in tree if name == "allreduce.issue"}
        assert allreduce_depths == {2}


def test_trace_json_has_both_ranks_nested(profiled_run):
    _, run_dir = profiled_run
    trace = json.loads((run_dir / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    by_rank = defaultdict(list)
    for e in spans:
        by_rank[e["pid"]].append(e)
    assert set(by_rank) == {0, 1}
    for events in by_rank.values():
        steps = sorted((e for e in events if e["name"] == "step"), key=lambda e: e["ts"])
        assert [e["args"]["step"] for e in steps] == list(range(STEPS))
        for step in steps:   # fwd/bwd of both micro-batches nest inside their step
            inside = [e for e in events if e["name"] in ("fwd", "bwd") and step["ts"] <= e["ts"]
                      and e["ts"] + e["dur"] <= step["ts"] + step["dur"] + 1e-3]
            assert sorted(e["args"]["mb"] for e in inside) == [0, 0, 1, 1]
        main = sorted((e for e in events if e["tid"] == 0 and e["name"] == "fwd"), key=lambda e: e["ts"])
        assert all(a["ts"] + a["dur"] <= b["ts"] for a, b in zip(main, main[1:], strict=False))
