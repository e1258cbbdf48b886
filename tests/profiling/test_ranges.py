"""profiling.range: NVTX really emitted (through a real injection library), timeline, torch.profiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gpu_workbench import profiling
from gpu_workbench.profiling import mark, timeline
from gpu_workbench.profiling import range as prange
from tests.profiling.conftest import NO_NVTX, nesting, read_nvtx_logs

SCRIPT = textwrap.dedent("""
    from gpu_workbench.profiling import range as prange, mark

    @prange("optimizer")
    def optimizer_step():
        mark("clip", step=7)

    with prange("step", step=7):
        for mb in range(3):
            with prange("fwd", mb=mb, stage=0):
                pass
            with prange("bwd", mb=mb, stage=0):
                pass
        optimizer_step()
""")


def _run(env_extra: dict, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)


def test_nvtx_ranges_reach_an_attached_tool(nvtx_recorder, tmp_path):
    pytest.importorskip("nvtx", reason=NO_NVTX)
    log = tmp_path / "nvtx"
    out = _run({"NVTX_INJECTION64_PATH": str(nvtx_recorder), "WB_NVTX_LOG": str(log)}, tmp_path)
    assert out.returncode == 0, out.stderr
    (events,) = read_nvtx_logs(log).values()
    tree = nesting(events)
    assert tree[0] == (0, "step", 7)
    assert [(d, m, p) for d, m, p in tree[1:7]] == [(1, "fwd", 0), (1, "bwd", 0), (1, "fwd", 1), (1, "bwd", 1),
                                                    (1, "fwd", 2), (1, "bwd", 2)]
    assert tree[7][:2] == (1, "optimizer")
    assert "mark wb clip 7" in events


def test_nvtx_disable_and_wb_profiling_turn_it_off(nvtx_recorder, tmp_path):
    for switch in ({"NVTX_DISABLE": "1"}, {"WB_PROFILING": "0"}):
        log = tmp_path / f"off{len(switch)}{next(iter(switch))}"
        out = _run({"NVTX_INJECTION64_PATH": str(nvtx_recorder), "WB_NVTX_LOG": str(log), **switch}, tmp_path)
        assert out.returncode == 0, out.stderr
        assert all(not lines for lines in read_nvtx_logs(log).values())


def test_nothing_listening_means_no_nvtx_calls(monkeypatch):
    monkeypatch.delenv("NVTX_INJECTION64_PATH", raising=False)
    profiling.refresh_listeners()
    from gpu_workbench.profiling.ranges import _nvtx

    assert not _nvtx.on
    with prange("fwd", mb=1) as r:
        assert not r._pushed and r._rf is None and r._t0 is None


def test_timeline_nested_spans_and_merged_trace(tmp_path):
    for rank in (0, 1):
        timeline.start(tmp_path, rank=rank)
        with prange("step", step=1):
            for mb in range(2):
                with prange("fwd", mb=mb):
                    pass
            mark("done")
        timeline.write()
    assert not timeline.enabled()
    trace = json.loads(timeline.merge(tmp_path, tmp_path / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    for rank in (0, 1):
        mine = [e for e in spans if e["pid"] == rank]
        step = next(e for e in mine if e["name"] == "step")
        fwds = [e for e in mine if e["name"] == "fwd"]
        assert [f["args"]["mb"] for f in fwds] == [0, 1]
        for f in fwds:  # nested inside the step
            assert step["ts"] <= f["ts"] and f["ts"] + f["dur"] <= step["ts"] + step["dur"] + 1e-3
        assert fwds[0]["ts"] + fwds[0]["dur"] <= fwds[1]["ts"]
    assert min(e["ts"] for e in spans) == 0


def test_torch_profiler_sees_the_ranges():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with prange("fwd", mb=4):
            torch.ones(8).sum()
        with prange("fwd", mb=5):
            torch.ones(8).sum()
    fwd = [evt for evt in prof.key_averages() if evt.key.startswith("fwd")]
    assert [evt.key for evt in fwd] == ["fwd"] and fwd[0].count == 2   # grouped by name, not by payload


def test_kernel_benchmark_launches_sit_in_their_range(nvtx_recorder, tmp_path):
    """What `wb profile ncu --range softmax -- wb kernels bench softmax` relies on."""
    pytest.importorskip("nvtx", reason=NO_NVTX)
    log = tmp_path / "bench"
    env = {**os.environ, "NVTX_INJECTION64_PATH": str(nvtx_recorder), "WB_NVTX_LOG": str(log)}
    done = subprocess.run([sys.executable, "-m", "gpu_workbench", "kernels", "bench", "softmax", "--quick"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (events,) = read_nvtx_logs(log).values()
    ranges = nesting(events)
    assert len(ranges) > 10 and {name for _, name, _ in ranges} == {"softmax"}
