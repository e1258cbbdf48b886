"""Helpers for the parallel tests: run configs in-process or under a real torchrun, read results.

Run as a script under torchrun, it trains each (config, overrides) of its JSON argument in turn
inside the same process group, so one launch (one interpreter start, one DeepSpeed import per rank)
serves several recipes.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from tests.helpers.cli import ROOT, WORKERS, env, wb  # noqa: F401  (the shared CLI helper, re-exported for the parallel tests)
from tests.helpers.cli import torchrun as launch

TINY = str(ROOT / "configs" / "tiny.toml")
# A tiny model of >= 1M parameters (the memory targets ask for it), 10 steps, no progress bar.
# The GPU image has no DeepSpeed (README.md, Supported stacks): there the ZeRO recipes cannot run, and what
# needs them skips with this reason while the other recipes' runs and checks go on.
def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:   # a blocker on sys.meta_path (scripts/gpu_summary.py's preflight): not here
        return False


HAS_DEEPSPEED = installed("deepspeed")
NO_DEEPSPEED = "deepspeed is not installed: the ZeRO recipes (zero1/2/3) cannot run here"


def needs_deepspeed(recipe: str) -> bool:
    """Whether `recipe` (a name, or overrides holding `recipe=...`) is a DeepSpeed ZeRO recipe."""
    return recipe.removeprefix("recipe=").startswith("zero")


def runnable(recipe: str) -> bool:
    """False for a ZeRO recipe without DeepSpeed installed."""
    return HAS_DEEPSPEED or not needs_deepspeed(recipe)


def skip_unless_runnable(recipe: str) -> None:
    import pytest

    if not runnable(recipe):
        pytest.skip(NO_DEEPSPEED)


BASE = ["steps=10", "progress=false", "checkpoint.every=0", "checkpoint.save_final=true", "model.d_model=128",
        "model.n_layers=5", "global_batch=16", "micro_batch=4", "optim.warmup_steps=3"]


def torchrun(nproc: int, runs: list[tuple[str, list[str]]], timeout: int = 600, archs: dict | None = None,
             path: str = "") -> None:
    """Train each (config path, overrides) in order under one `torchrun --standalone` of nproc ranks. `archs`:
    architectures each rank registers first (name -> "module:SPEC", importable from `path`)."""
    extra = {"WB_TEST_ARCHS": json.dumps(archs or {}), "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path) if p)}
    launch(WORKERS / "train_runs.py", nproc, json.dumps(runs), timeout=timeout, env=extra)


def losses(run_dir: Path) -> list[float]:
    from gpu_workbench.parallel.runtime.rundir import read_metrics

    return [m["loss"] for m in read_metrics(run_dir)]


def summary(run_dir: Path) -> dict:
    """summary.json through the typed loader (schema checked), every field in one dict."""
    from gpu_workbench.parallel.runtime.summary import RunSummary

    return RunSummary.load(Path(run_dir) / "summary.json").flat()


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "final_model.pt", weights_only=True)


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters as one vector (docs/ARCHITECTURE.md, Testing), after
    checking that no single element differs by more than 1e-4. Per tensor the ratio is noisier: where a gradient
    is ~0 (a bias, say), Adam's m / sqrt(v) turns rounding differences into lr-sized steps."""
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst < 1e-4, f"an element differs by {worst:.2e}"
    flat_a = torch.cat([a[k].double().flatten() for k in a])
    flat_b = torch.cat([b[k].double().flatten() for k in a])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def assert_matches_single(run_dir: Path, single_dir: Path, steps: int, norms: bool = True, tol: float = 1e-5) -> None:
    """The one "matches single" assertion (docs/ARCHITECTURE.md, Testing): per-step losses, clipping norms (where
    the recipe reports the same global norm), held-out losses and final parameters equal `single`'s."""
    from gpu_workbench.parallel.runtime.rundir import read_evals, read_metrics

    ref, got = losses(single_dir), losses(run_dir)
    assert len(ref) == len(got) == steps, (len(got), len(ref), steps)
    worst = max(rel(a, b) for a, b in zip(got, ref, strict=True))
    assert worst < tol, f"{run_dir}: per-step losses {got} vs single {ref} (worst rel {worst:.2e})"
    if norms:
        got_norms, ref_norms = ([m["grad_norm"] for m in read_metrics(d)] for d in (run_dir, single_dir))
        assert max(rel(a, b) for a, b in zip(got_norms, ref_norms, strict=True)) < tol, (got_norms, ref_norms)
    val, ref_val = ([m["val_loss"] for m in read_evals(d)] for d in (run_dir, single_dir))
    assert len(val) == len(ref_val) and all(rel(a, b) < tol for a, b in zip(val, ref_val, strict=True)), (val, ref_val)
    diff = max_rel_diff(final_params(run_dir), final_params(single_dir))
    assert diff < tol, f"{run_dir}: final parameters differ from single by {diff:.2e} (relative)"


def train_single(run_dir: Path, overrides: list[str], config: str = TINY) -> Path:
    """The one `single` reference: `config` with `overrides`, trained by recipe=single in this process."""
    from gpu_workbench.parallel import RunConfig, train

    train(RunConfig.from_toml(config, [*overrides, "recipe=single", f"run_dir={run_dir}"]))
    return Path(run_dir)


def refused_in_process(capsys, args: list[str], message: str) -> None:
    """`wb train --config TINY ARGS` through the CLI's entry point in this process (no interpreter start):
    exit code 2 and one line `wb: error: ...` on stderr that holds `message`."""
    import pytest

    from gpu_workbench.cli.app import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", TINY, *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wb: error: "), err
    assert message in err, err
