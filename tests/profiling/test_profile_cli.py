"""`wb profile`: the commands users expect, per-rank wrapping for real, the nsys sqlite summary."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import textwrap

import pytest

from gpu_workbench.profiling import nsight, rank_wrap
from tests.helpers.cli import torchrun, wb


def _wrap_spec(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("command:"))
    return json.loads(line.split("WB_RANK_WRAP='", 1)[1].split("'", 1)[0])


def test_nsys_dry_run_has_the_expected_flags():
    out = wb("profile", "nsys", "--steps", "3:5", "--ranks", "0,2", "--dry-run", "--",
             "wb", "train", "--recipe", "ddp", "--nproc", "4", "--run-dir", "runs/p")
    assert out.returncode == 0, out.stderr
    spec = _wrap_spec(out.stdout)
    prefix = spec["prefix"]
    assert prefix[:2] == ["nsys", "profile"]
    for flag in (["-t", "cuda,nvtx,osrt,cudnn,cublas"], ["-s", "none"], ["-c", "cudaProfilerApi"],
                 ["-o", "runs/p/nsys/rank{rank}"]):
        i = prefix.index(flag[0])
        assert prefix[i:i + 2] == flag
    assert "--cpuctxsw=none" in prefix and "--capture-range-end=stop" in prefix
    assert spec["ranks"] == [0, 2] and spec["multi_process"] is True
    assert "WB_PROFILE_STEPS=3:5" in out.stdout


def test_ncu_dry_run_filters_on_the_wb_range():
    out = wb("profile", "ncu", "--range", "softmax", "--kernel", "softmax_fwd.*", "--dry-run", "--",
             "wb", "kernels", "bench", "softmax")
    assert out.returncode == 0, out.stderr
    prefix = _wrap_spec(out.stdout)["prefix"]
    assert prefix[0] == "ncu" and "--nvtx" in prefix
    assert prefix[prefix.index("--nvtx-include") + 1] == "wb@softmax/"
    assert prefix[prefix.index("--target-processes") + 1] == "all"
    assert prefix[prefix.index("--set") + 1] == "full"
    assert prefix[prefix.index("-k") + 1] == "regex:softmax_fwd.*"


@pytest.mark.parametrize("args,message", [
    (["profile", "nsys", "--", "wb", "kernels", "bench"], "nsys is not installed"),
    (["profile", "ncu", "--range", "fwd", "--", "wb", "kernels", "bench"], "ncu is not installed"),
    (["profile", "nsys", "--steps", "5:3", "--dry-run", "--", "wb", "train"], "--steps='5:3'"),
    (["profile", "nsys", "--ranks", "a", "--dry-run", "--", "wb", "train"], "--ranks='a'"),
    (["profile", "nsys", "--dry-run"], "give the command to profile after --"),
    (["profile", "summarize", "missing.sqlite"], "does not exist"),
])
def test_mistakes_are_one_line(args, message):
    out = wb(*args, env={"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_only_selected_ranks_run_under_the_tool(tmp_path):
    """A real 2-process torchrun job; `env VAR=...` stands in for nsys as the wrapping tool."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from gpu_workbench.profiling.rank_wrap import exec_under_tool_if_asked
        exec_under_tool_if_asked([sys.executable, {str(script)!r}])
        with open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"]), "w") as f:
            f.write(os.environ.get("WRAPPED_AS", "plain"))
    """))
    torchrun(script, 2, env=rank_wrap.wrap_env(["env", "WRAPPED_AS=tool-rank{rank}"], [1], multi_process=True),
             timeout=120)
    assert (tmp_path / "rank0").read_text() == "plain"
    assert (tmp_path / "rank1").read_text() == "tool-rank1"


def _fake_nsys_export(path):
    """The four tables of an `nsys export --type sqlite` file that the summary reads, with known times."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT);
        CREATE TABLE NVTX_EVENTS (start INT, end INT, eventType INT, text TEXT, textId INT, globalTid INT);
        CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INT, end INT, globalTid INT, correlationId INT);
        CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INT, end INT, correlationId INT);
        INSERT INTO StringIds VALUES (1, 'fwd');
        -- thread 7: step [0, 100] > fwd [10, 40] (registered string) and bwd [50, 90]; a mark (type 34)
        INSERT INTO NVTX_EVENTS VALUES (0, 100, 59, 'step', NULL, 7), (10, 40, 59, NULL, 1, 7),
                                       (50, 90, 59, 'bwd', NULL, 7), (60, NULL, 34, 'mark', NULL, 7);
        -- launches: two in fwd, one in bwd, one on another thread inside the same time window
        INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (12, 14, 7, 1), (20, 22, 7, 2), (55, 57, 7, 3), (15, 16, 8, 4);
        INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (30, 35, 1), (40, 48, 2), (60, 80, 3), (15, 115, 4);
    """)
    db.commit()
    db.close()


def test_summary_projects_kernel_time_onto_ranges(tmp_path):
    report = tmp_path / "rank0.sqlite"
    _fake_nsys_export(report)
    rows = {r["range"]: r for r in nsight.summarize(report)}
    assert set(rows) == {"step", "fwd", "bwd"}
    assert rows["fwd"]["gpu_kernel_ms"] == pytest.approx(13e-6) and rows["fwd"]["kernels"] == 2
    assert rows["bwd"]["gpu_kernel_ms"] == pytest.approx(20e-6)
    assert rows["step"]["gpu_kernel_ms"] == pytest.approx(33e-6)  # thread 8's kernel is not this range's
    assert rows["step"]["cpu_ms"] == pytest.approx(100e-6)
    out = wb("profile", "summarize", str(report))
    assert out.returncode == 0 and "fwd" in out.stdout


def test_torch_profiler_writes_a_trace_per_rank(tmp_path):
    """`wb profile torch` around a real 2-process ddp run: one trace per rank (one profiling cycle), with the
    distributed metadata Holistic Trace Analysis reads, the wb ranges inside, and a key_averages table whose
    rows group a range over its micro-batches and steps."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    run_dir, prof = tmp_path / "run", tmp_path / "prof"
    out = wb("profile", "torch", "--wait", "1", "--warmup", "1", "--active", "1", "--ranks", "0,1", "--out", str(prof),
             "--", "wb", "train", "--recipe",
             "ddp", "--nproc", "2", "--config", str(root / "configs" / "tiny.toml"), "--run-dir", str(run_dir),
             "steps=7", "global_batch=8", "micro_batch=2", "progress=false", "checkpoint.every=0",
             env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (run_dir / "torch_profile").exists()   # --out
    for rank in (0, 1):
        (trace_file,) = prof.glob(f"rank{rank}.*.pt.trace.json")
        trace = json.loads(trace_file.read_text())
        assert trace["distributedInfo"]["rank"] == rank and trace["distributedInfo"]["world_size"] == 2
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"fwd", "bwd", "optimizer"} <= names   # one cycle (7 steps hold two of 3), one trace per rank
        table = (prof / f"key_averages-rank{rank}.txt").read_text()
        fwd_rows = [ln for ln in table.splitlines() if ln.split() and ln.split()[0] == "fwd"]
        assert len(fwd_rows) == 1 and "mb=" not in table   # the 2 micro-batches' ranges grouped in one row


def test_torch_profiler_runs_only_on_the_selected_ranks(tmp_path, monkeypatch):
    """WB_TORCH_PROFILE_RANKS (`wb profile torch --ranks`): the other ranks start no profiler and write nothing;
    WB_TORCH_PROFILE_OUT (`--out`) is where the selected one writes."""
    from gpu_workbench.profiling.session import ProfileSession

    monkeypatch.setenv("WB_TORCH_PROFILE", "0,0,1")
    monkeypatch.setenv("WB_TORCH_PROFILE_RANKS", "1")
    monkeypatch.setenv("WB_TORCH_PROFILE_OUT", str(tmp_path / "prof"))
    sessions = {rank: ProfileSession.from_env(tmp_path / "run", rank) for rank in (0, 1)}
    assert sessions[0]._torch is None and sessions[1]._torch is not None
    for session in sessions.values():
        session.end_step(0)
        session.close()
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "prof").glob("*.pt.trace.json")) == ["rank1"]
    assert not (tmp_path / "run").exists()
