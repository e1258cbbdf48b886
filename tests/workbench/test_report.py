"""`wb compare` runs recipes for real and writes a report whose numbers are the runs' own; `wb report`
rebuilds it from the run directories alone."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image
import pytest

from parallel.loop.summary import RunSummary
from tests.cli import wb
from workbench.report import COLUMNS, MB


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    done = wb("compare", "--recipes", "single,ddp", "--nproc", "2", "--out", str(out), "steps=4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in done.stdout.replace("\n", "")
    return out


def _table(report: str) -> list[dict]:
    lines = [ln for ln in report.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]


def _check_report(out: Path, run_dirs: list[Path]) -> None:
    report = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"loss_vs_step.png", "loss_vs_time.png", "throughput.png", "model_state_memory.png",
            "peak_memory.png"} <= set(figures)
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(out / name).shape[0] > 100
    rows = {r["recipe"]: r for r in _table(report.split("## Runs", 1)[1].split("##", 1)[0])}
    for run_dir in run_dirs:
        summary = RunSummary.load(run_dir / "summary.json").flat()
        row = rows[summary["recipe"]]
        for header, key, fmt in COLUMNS:
            if header not in row or summary.get(key) is None:
                continue
            if fmt == "{}":
                assert row[header] == str(summary[key])
            else:
                value = summary[key] / MB if fmt == "mb" else summary[key]
                assert float(row[header]) == pytest.approx(value, rel=1e-4, abs=1e-4), header


def test_compare_report_matches_the_runs(compared):
    run_dirs = [compared / "single", compared / "ddp"]
    _check_report(compared, run_dirs)
    single = RunSummary.load(compared / "single" / "summary.json").flat()
    ddp = RunSummary.load(compared / "ddp" / "summary.json").flat()
    assert single["global_batch"] == ddp["global_batch"] and ddp["world_size"] == 2
    assert single["final_loss"] == pytest.approx(ddp["final_loss"], rel=1e-5)   # same data, seed, batch


def test_report_rebuilds_from_run_dirs_without_rerunning(compared, tmp_path):
    run_dirs = [compared / "single", compared / "ddp"]
    before = {p: p.stat().st_mtime_ns for d in run_dirs for p in d.rglob("*") if p.is_file()}
    done = wb("report", *map(str, run_dirs), "--out", str(tmp_path / "again"))
    assert done.returncode == 0, done.stderr
    _check_report(tmp_path / "again", run_dirs)
    assert before == {p: p.stat().st_mtime_ns for d in run_dirs for p in d.rglob("*") if p.is_file()}


def test_compare_refuses_to_reuse_runs_and_unknown_recipes(compared):
    reuse = wb("compare", "--recipes", "single", "--out", str(compared), "steps=2")
    assert reuse.returncode == 2 and "already holds runs of single" in reuse.stderr
    unknown = wb("compare", "--recipes", "single,warp-drive", "--out", str(compared / "x"))
    assert unknown.returncode == 2 and "unknown recipe(s) warp-drive" in unknown.stderr


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    done = wb("report", str(tmp_path))
    assert done.returncode == 2 and "is not a finished run directory" in done.stderr
