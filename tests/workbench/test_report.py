"""`wb compare` runs recipes for real and writes a report whose numbers are the runs' own; `wb report`
rebuilds it from the run directories alone."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image
import pytest

from gpu_workbench.cli.report import COLUMNS, MIB, load_run
from gpu_workbench.parallel.runtime.summary import RunSummary
from tests.helpers.cli import wb


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    done = wb("compare", "--recipes", "single,ddp,ddp:tp.degree=2", "--nproc", "2", "--out", str(out), "steps=4")
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
    assert {"loss_vs_tokens.png", "loss_vs_step.png", "loss_vs_time.png", "dynamics.png", "throughput.png",
            "model_state_memory.png", "peak_memory.png"} <= set(figures)
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(out / name).shape[0] > 100
    rows = {r["recipe"]: r for r in _table(report.split("## Runs", 1)[1].split("##", 1)[0])}
    for run_dir in run_dirs:
        summary = RunSummary.load(run_dir / "summary.json").flat()
        metrics = load_run(run_dir).metrics   # the tokens axis: tokens_per_step per step, counted
        assert [m["tokens"] for m in metrics] == [(m["step"] + 1) * summary["tokens_per_step"] for m in metrics]
        row = rows[load_run(run_dir).label]
        assert row["recipe"].split()[0] == summary["recipe"]
        for header, key, fmt in COLUMNS:
            if header not in row or summary.get(key) is None or key == "recipe":
                continue
            if fmt == "{}":
                assert row[header] == str(summary[key])
            else:
                value = summary[key] / MIB if fmt == "mib" else summary[key]
                assert float(row[header]) == pytest.approx(value, rel=1e-4, abs=1e-4), header


def test_compare_report_matches_the_runs(compared):
    run_dirs = [compared / "single", compared / "ddp", compared / "ddp-tp.degree=2"]
    _check_report(compared, run_dirs)
    tp = RunSummary.load(run_dirs[2] / "summary.json").flat()
    rows = {r["recipe"]: r for r in _table((compared / "report.md").read_text().split("## Runs", 1)[1].split("##")[0])}
    assert set(rows) == {"single", "ddp", "ddp tp=2"}   # a run of its own settings, labelled by its layout
    assert tp["parallel_dims"]["tp"] == 2 and rows["ddp tp=2"]["TP MiB/step/rank measured"] != "—"
    assert rows["ddp"]["TP MiB/step/rank measured"] == "—"   # measured only where TP ran
    single = RunSummary.load(run_dirs[0] / "summary.json").flat()
    assert tp["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)   # TP computes what one process does
    single = RunSummary.load(compared / "single" / "summary.json").flat()
    ddp = RunSummary.load(compared / "ddp" / "summary.json").flat()
    assert single["global_batch"] == ddp["global_batch"] and ddp["world_size"] == 2
    assert single["final_loss"] == pytest.approx(ddp["final_loss"], rel=1e-5)   # same data, seed, batch


def test_every_summary_records_its_provenance_and_the_report_shows_it(compared):
    import subprocess

    from tests.helpers.cli import ROOT

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = head.stdout.strip()
    report = (compared / "report.md").read_text()
    provenance = report.split("## Provenance", 1)[1].split("##", 1)[0]
    rows = {r["run"]: r for r in _table(provenance)}
    import torch

    for recipe in ("single", "ddp"):
        p = RunSummary.load(compared / recipe / "summary.json").provenance
        assert p["git_commit"] == commit and isinstance(p["git_dirty"], bool)
        assert p["versions"]["torch"] == torch.__version__ and p["machine"]["device"].startswith("CPU")
        assert rows[recipe]["commit"].startswith(commit[:10]) and rows[recipe]["torch"] == torch.__version__
        assert rows[recipe]["config sha256"] == p["config_sha256"][:12]
        assert re.fullmatch(r"[0-9a-f]{64}", p["config_sha256"])
    assert rows["single"]["config sha256"] != rows["ddp"]["config sha256"]   # the configs differ in the recipe
    assert "Warning" not in report   # ... and in nothing else


def test_report_warns_when_runs_differ_in_more_than_the_recipe(compared, tmp_path):
    import json
    import shutil

    longer = tmp_path / "longer"
    shutil.copytree(compared / "ddp", longer)
    config = json.loads((longer / "config.json").read_text())
    config["steps"], config["optim"]["lr"] = 40, 0.5
    (longer / "config.json").write_text(json.dumps(config))
    done = wb("report", str(compared / "single"), str(longer), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    warning = next(ln for ln in (tmp_path / "out" / "report.md").read_text().splitlines() if "Warning" in ln)
    assert "optim.lr: single=0.003, ddp=0.5" in warning and "steps: single=4, ddp=40" in warning
    assert "run_dir" not in warning and "recipe" not in warning.split(":", 1)[1].split("comparison")[1]


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
