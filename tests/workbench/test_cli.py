"""`wb` from a user's shell: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
import typer.main

from gpu_workbench.cli.app import app, main
from tests.helpers.cli import wb


def _commands(cmd, path=()):
    """(path, click command) for `cmd` and every command under it, from the typer app itself."""
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


TREE = list(_commands(typer.main.get_command(app)))
GROUPS = {path: sorted(cmd.commands) for path, cmd in TREE if hasattr(cmd, "commands")}   # () is `wb` itself
COMMANDS = [path for path, cmd in TREE if not hasattr(cmd, "commands")]


def _listed(help_text: str) -> list[str]:
    """The names in the help's Commands panel: rows that start a cell (`│ name  description`)."""
    panel = help_text.split("Commands", 1)[1].split("╰", 1)[0]
    return sorted(re.findall(r"^│ (\S+)\s", panel, flags=re.M))


def test_help_lists_every_registered_command():
    assert len(GROUPS) > 1 and len(COMMANDS) > len(GROUPS)   # the walk found the sub-apps and their commands
    out = wb("--help")   # the real entry point once
    assert out.returncode == 0, out.stderr
    assert _listed(out.stdout) == GROUPS[()]


@pytest.mark.parametrize("path", [p for p in GROUPS if p], ids=" ".join)
def test_each_group_help_lists_its_commands(path, capsys):
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    assert _listed(capsys.readouterr().out) == GROUPS[path]


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_leaf_command_help_exits_0(path, capsys):
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert f"Usage: wb {' '.join(path)} " in out


@pytest.mark.parametrize("command", ["check", "bench", "compile"])
def test_kernel_commands_name_every_registered_kernel(command, capsys):
    """The kernel list of `wb kernels ... --help` is the kernel registry's, read without importing torch."""
    from gpu_workbench.cli.kernels_cli import registered_kernels
    from gpu_workbench.kernels.suite import KERNELS

    assert registered_kernels() == list(KERNELS)
    with pytest.raises(SystemExit):
        main(["kernels", command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in KERNELS), help_text


def test_kernels_check_softmax_passes_and_writes_json(tmp_path):
    """The command and its JSON; on the torch backend (the interpreter's rows, 8x the CPU time, run in
    tests/kernels/test_softmax.py and on Triton 3.6 in `make test-triton36`)."""
    out = wb("kernels", "check", "softmax", "--backend", "torch", "--json", str(tmp_path / "rows.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed" in out.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) >= 18 and {r["backend"] for r in rows} == {"torch"}
    assert all(max(r["errors"].values()) <= r["tolerance"] for r in rows)


def test_kernels_check_exits_1_when_a_row_fails(monkeypatch, capsys):
    from gpu_workbench.kernels.suite import common

    monkeypatch.setattr(common, "TOLERANCE", {k: 0.0 for k in common.TOLERANCE})
    # the suite module imported TOLERANCE by name: patch it there too
    import gpu_workbench.kernels.suite.softmax as sm

    monkeypatch.setattr(sm, "TOLERANCE", common.TOLERANCE)
    with pytest.raises(SystemExit) as done:
        main(["kernels", "check", "softmax", "--backend", "torch"])
    assert done.value.code == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["kernels", "check", "softmax", "--backend", "cuda"], "backend='cuda' is not a kernel backend"),
    (["kernels", "check", "flash"], "unknown kernel 'flash'"),
    (["kernels", "compile", "softmax", "--arch", "75"], "--arch 75 is not supported"),
    (["kernels", "compile", "softmax", "--arch", "sm90"], "--arch='sm90' must be comma-separated integers"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, message):
    out = wb(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_unknown_option_is_a_usage_error():
    out = wb("kernels", "check", "--no-such-flag")
    assert out.returncode == 2 and "No such option" in out.stderr


def test_compile_table_for_softmax_on_one_arch():
    # a slice of the specs through the worker pool; every config compiles in tests/kernels/test_gpu_compile.py
    out = wb("kernels", "compile", "softmax", "--arch", "90", "--jobs", "2", "--match", "fwd block fp16")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    assert "softmax fwd block fp16" in out.stdout and " 0 failed" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU table; GPU figures come from scripts/gpu_check.sh")
def test_bench_prints_cpu_table(tmp_path):
    out = wb("kernels", "bench", "softmax", "--quick", "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "b.json").read_text())
    assert rows and all(r["ms"] > 0 and r["metrics"]["vs torch"] > 0 for r in rows)
    assert all(0 <= r["iqr_ms"] < float("inf") for r in rows)   # every row carries its spread
    assert "IQR ms" in out.stdout and "vs X = X's median time / ours" in out.stdout
    assert "On a CPU both sides run torch code" in out.stdout


def test_time_ms_reports_quartiles_of_real_samples():
    import time

    from gpu_workbench.kernels.suite.common import BenchRow, time_ms

    sleeps = iter([0.0] + [0.001, 0.004] * 100)   # a warm-up call, then alternating 1 ms and 4 ms calls
    timing = time_ms(lambda: time.sleep(next(sleeps)), "cpu")
    assert 0.9 <= timing.q1 <= float(timing) <= timing.q3 and timing.q3 >= 3.9 and timing.iqr >= 2.5
    row = BenchRow("k", "case", "float32", timing, {})
    assert type(row.ms) is float and row.ms == float(timing) and row.iqr_ms == timing.iqr


def test_bench_notes_warn_about_a_loaded_machine(monkeypatch):
    import os

    from gpu_workbench.cli.kernels_cli import bench_notes

    monkeypatch.setattr(os, "getloadavg", lambda: (1.8, 1.0, 1.0))   # the reading a busy 2-CPU box gives
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    notes = bench_notes("cpu", ["GB/s", "vs torch"], threads=2)
    assert any("load average 1.8 on 2 CPUs" in n for n in notes)
    assert any("2 intra-op threads" in n for n in notes)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert not [n for n in bench_notes("cuda", ["TFLOP/s"], threads=1) if "warning" in n]


def test_the_cli_starts_without_importing_torch():
    """A mistake on the command line is answered in a fraction of a second: `gpu_workbench.cli.app` imports no torch,
    DeepSpeed, Ray or matplotlib until a command needs them (docs/ARCHITECTURE.md, Testing)."""
    import subprocess
    import sys

    code = ("import sys, gpu_workbench.cli.app; "
            "heavy = [m for m in ('torch', 'deepspeed', 'ray', 'matplotlib', 'triton') if m in sys.modules]; "
            "print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
