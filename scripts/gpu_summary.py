"""The short table printed last by scripts/gpu_check.sh, and the dry run's preflight.

    python scripts/gpu_summary.py OUT_DIR     # test counts, check and compile counts, every bench row
    python scripts/gpu_summary.py --preflight # on any machine: does everything the GPU check uses exist?

The preflight blocks `deepspeed`, `ray` and `nvtx` (and any module named in WB_PREFLIGHT_BLOCK,
comma-separated, so a test can prove the preflight fails) before importing anything, so it also
proves that the GPU check runs without them. It exits 1 on any problem.
"""

from __future__ import annotations

import importlib
import importlib.abc
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_NEEDED = ("deepspeed", "ray", "nvtx")
NEEDED = ("torch", "triton", "numpy", "typer", "rich", "pytest")
# Every CLI command and option scripts/gpu_check.sh passes.
CLI_USE = {"check": ("--backend", "--json"), "compile": ("--arch", "--json"), "bench": ("--json",)}


def main(out: Path) -> None:
    env = (out / "env.txt").read_text().splitlines() if (out / "env.txt").exists() else []
    print(f"== summary ({env[1] if len(env) > 1 else '?'})")
    log = (out / "gpu_tests.log").read_text() if (out / "gpu_tests.log").exists() else ""
    counts = re.findall(r"(\d+) (passed|failed|skipped|error)", log.splitlines()[-1] if log.strip() else "")
    print("pytest -m gpu:", ", ".join(f"{n} {k}" for n, k in counts) or "no result")
    if (out / "check.json").exists():
        rows = json.loads((out / "check.json").read_text())
        bad = [r for r in rows if max(r["errors"].values()) > r["tolerance"]]
        print(f"kernels check: {len(rows) - len(bad)} passed, {len(bad)} failed")
        for r in bad[:10]:
            print("  FAIL", r["kernel"], r["case"], r["dtype"], r["errors"])
    if (out / "compile.json").exists():
        rows = json.loads((out / "compile.json").read_text())
        bad = [r for r in rows if not r["passed"]]
        spilling = sum(bool(r["ok"] and r["spill_bytes"]) for r in rows)
        print(f"kernels compile: {len(rows) - len(bad)} passed, {len(bad)} failed ({spilling} spilling)")
        for r in bad[:10]:
            print("  FAIL", r["spec"]["label"], f"sm_{r['arch']}", r["failure"])
    if (out / "bench.json").exists():
        rows = json.loads((out / "bench.json").read_text())
        print(f"{'kernel':<34}{'case':<26}{'dtype':<10}{'ms':>9}  metrics")
        for r in rows:
            metrics = "  ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items())
            print(f"{r['kernel']:<34}{r['case']:<26}{r['dtype']:<10}{r['ms']:>9.4f}  {metrics}")
    train = out / "llama-1b" / "summary.json"
    if train.exists():   # tokens/s is the median step's; MFU against the GPU's dense bf16 peak
        s = json.loads(train.read_text())
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "?"
        print(f"train llama-1b: {s['n_params'] / 1e9:.2f}B params, {s['tokens_per_s']:.0f} tokens/s, MFU {mfu}, "
              f"peak {s['peak_memory_bytes_per_rank'] / 2**30:.1f} GiB, final loss {s['final_loss']:.3f}")
        _speed_rows(out, s)


def _speed_rows(out: Path, base: dict) -> None:
    """Issue 34's llama-1b rows (compiled, fp8, selective checkpointing) against the bf16 eager baseline.
    Goals: MFU >= 40% compiled bf16; fp8 compiled >= 1.2x compiled bf16."""
    print(f"{'llama-1b run':<34}{'tokens/s':>10}{'x eager':>9}{'MFU':>8}{'peak GiB':>10}{'compile s':>11}")
    for run in sorted(out.glob("llama-1b-*/summary.json")):
        s = json.loads(run.read_text())
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "?"
        compile_s = f"{s['compile_s']:.0f}" if s.get("compile_s") is not None else "-"
        print(f"{run.parent.name:<34}{s['tokens_per_s']:>10.0f}{s['tokens_per_s'] / base['tokens_per_s']:>9.2f}"
              f"{mfu:>8}{s['peak_memory_bytes_per_rank'] / 2**30:>10.1f}{compile_s:>11}")


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes `import NAME` (and its submodules) fail, as on a machine without the package."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is blocked by the preflight (the GPU check must not need it)")
        return None


def _check_packages(report) -> None:
    report(sys.version_info >= (3, 10), f"python {sys.version.split()[0]} >= 3.10")
    for name in NEEDED:
        try:
            module = importlib.import_module(name)
            report(True, f"import {name} {getattr(module, '__version__', '')}")
        except ImportError as err:
            report(False, f"import {name}: {err}")
    from gpu_workbench.kernels import triton_compat as tc

    report(tc.OLDEST <= tc.version() <= tc.NEWEST,
           f"triton {'.'.join(map(str, tc.version()))} within the supported {tc.OLDEST}..{tc.NEWEST}")


def _check_calls(report) -> None:
    """The library functions the kernel checks and benchmarks call on a GPU."""
    import torch
    import triton.testing

    for name in ("do_bench", "do_bench_cudagraph"):
        report(callable(getattr(triton.testing, name, None)), f"triton.testing.{name}")
    for name in ("synchronize", "memory_allocated", "reset_peak_memory_stats", "max_memory_allocated",
                 "get_device_name", "get_device_capability", "is_available"):
        report(callable(getattr(torch.cuda, name, None)), f"torch.cuda.{name}")
    from gpu_workbench.kernels import suite

    for name in suite.KERNELS:
        module = suite.suite(name)
        for fn in ("check", "bench", "compile_specs"):
            report(callable(getattr(module, fn, None)), f"gpu_workbench.kernels.suite.{name}.{fn}")
        report(bool(module.compile_specs()), f"gpu_workbench.kernels.suite.{name}.compile_specs() lists specs")
    from gpu_workbench import profiling
    report(callable(getattr(profiling, "range", None)), "profiling.range (kernels bench)")


def _check_cli(report) -> None:
    import typer

    from gpu_workbench.cli import kernels_cli

    group = typer.main.get_command(kernels_cli.app)
    for command, options in CLI_USE.items():
        found = group.commands.get(command)
        report(found is not None, f"gpu_workbench.cli.kernels_cli {command}")
        if found is not None:
            flags = {flag for param in found.params for flag in param.opts}
            missing = [o for o in options if o not in flags]
            report(not missing, f"gpu_workbench.cli.kernels_cli {command} {' '.join(options)}"
                   + (f": missing {missing}" if missing else ""))


def _check_train(report) -> None:
    from gpu_workbench.parallel import RunConfig
    from gpu_workbench.parallel.recipes import resolve

    cfg = RunConfig.from_toml(ROOT / "configs" / "llama-1b.toml", ["device=cpu"])
    resolve(cfg, world_size=1)
    report(cfg.model.arch == "llama", "configs/llama-1b.toml resolves for the single recipe")


def _check_tests_collect(report) -> None:
    import pytest

    code = pytest.main(["tests/kernels", "-m", "gpu", "--collect-only", "-qq", "-p", "no:cacheprovider",
                        "-o", "addopts="])
    report(code == 0, f"pytest collects tests/kernels -m gpu (exit {code})")


def preflight() -> int:
    """Check everything scripts/gpu_check.sh imports and calls; return the number of problems."""
    extra = [n for n in os.environ.get("WB_PREFLIGHT_BLOCK", "").split(",") if n]
    sys.meta_path.insert(0, _Blocker(NOT_NEEDED + tuple(extra)))
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    problems = []

    def report(ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            problems.append(what)

    for step in (_check_packages, _check_calls, _check_cli, _check_train, _check_tests_collect):
        try:
            step(report)
        except Exception as err:  # a missing module or name anywhere in a step is a problem to report
            report(False, f"{step.__name__}: {type(err).__name__}: {err}")
    print(f"preflight: {len(problems)} problem(s)")
    return len(problems)


if __name__ == "__main__":
    if sys.argv[1:] == ["--preflight"]:
        sys.exit(1 if preflight() else 0)
    main(Path(sys.argv[1]))
