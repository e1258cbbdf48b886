"""`wb compare`: run several recipes on the same config, seed, data and global batch, then report.

Each recipe runs as its own `wb train` process (torchrun for several ranks), so a recipe that crashes
cannot take the others down; its error is listed in the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gpu_workbench.cli.paths import output_dir
from gpu_workbench.parallel.runtime.errors import UserError

# The order runs and plots appear in; recipes not (yet) in the registry are left out.
PREFERRED_ORDER = ["single", "ddp", "zero1", "zero2", "zero3", "fsdp", "pipeline", "async-ps", "local-sgd",
                   "diloco", "hogwild"]
DEMO_RECIPES = ["single", "ddp", "ddp:tp.degree=2", "zero1", "zero2", "zero3", "fsdp", "pipeline", "async-ps",
                "local-sgd"]

# A run of a comparison is a recipe, optionally with overrides of its own: "ddp:tp.degree=2" is ddp with
# tensor parallelism, beside plain "ddp" (the overrides every run gets come from the command line).


def split_spec(spec: str) -> tuple[str, list[str]]:
    """'ddp:tp.degree=2:tp.sequence_parallel=true' -> ('ddp', ['tp.degree=2', 'tp.sequence_parallel=true'])."""
    recipe, *overrides = spec.split(":")
    return recipe, overrides


def run_name(spec: str) -> str:
    """The run directory's name for a spec: 'ddp:tp.degree=2' -> 'ddp-tp.degree=2'."""
    return spec.replace(":", "-").replace("/", "_")


def available_recipes(wanted: list[str] | None = None) -> list[str]:
    from gpu_workbench.parallel.recipes import RECIPES

    if wanted is None:
        return [r for r in PREFERRED_ORDER if r in RECIPES]
    if not wanted:
        raise UserError(f"--recipes names no recipe; give some, e.g. --recipes ddp,zero2 (available: "
                        f"{', '.join(RECIPES)})")
    unknown = [spec for spec in wanted if split_spec(spec)[0] not in RECIPES]
    if unknown:
        raise UserError(f"--recipes: unknown recipe(s) {', '.join(unknown)}; available: {', '.join(RECIPES)} "
                        f"(a run of its own settings: recipe:key=value, e.g. ddp:tp.degree=2)")
    return wanted


def traces(spec: str) -> bool:
    """Whether this run's recipe writes the host timeline (others run without it, not refused)."""
    from gpu_workbench.parallel.recipes import RECIPES

    return RECIPES[split_spec(spec)[0]].timeline is None


def nproc_for(spec: str, nproc: int) -> int:
    """A recipe that runs on at most k processes (`single`: 1) gets min(k, nproc)."""
    from gpu_workbench.parallel.recipes import RECIPES

    most = RECIPES[split_spec(spec)[0]].max_world
    return min(most, nproc) if most else nproc


def parse_recipes(text: str | None) -> list[str] | None:
    """--recipes 'ddp, zero2,ddp' -> ['ddp', 'zero2'] (None: all); an empty list is refused later."""
    if text is None:
        return None
    return list(dict.fromkeys(r.strip() for r in text.split(",") if r.strip()))


def train_items(recipe: str, overrides: list[str], run_dir: Path, timeline: bool) -> list[str]:
    """The config overrides that the `wb train` of run_recipes turns its command line into (its own order:
    the arguments, then --recipe, --run-dir and --timeline as keys)."""
    return [*overrides, "progress=false", f"recipe={recipe}", f"run_dir={run_dir}",
            *(["profiling.timeline=true"] if timeline else [])]


def validate(recipes: list[str], nproc: int, config: Path, overrides: list[str], out: Path,
             timeline: bool = True) -> None:
    """Every recipe's config, as its `wb train` will build it, checked once before anything is launched:
    a misspelt key or an impossible layout is one UserError, not one failed run per recipe."""
    from gpu_workbench.parallel import RunConfig
    from gpu_workbench.parallel import recipes as registry

    for spec in recipes:
        recipe, own = split_spec(spec)
        traced = timeline and traces(spec)
        cfg = RunConfig.from_toml(config, train_items(recipe, [*overrides, *own], out / run_name(spec), traced))
        try:
            registry.resolve(cfg, nproc_for(spec, nproc))
        except UserError as mistake:
            raise UserError(f"{spec} (--nproc {nproc_for(spec, nproc)}): {mistake}") from None


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The most telling line of a failed run: its last error message, else its last words."""
    lines = [ln.strip() for ln in (result.stderr + "\n" + result.stdout).splitlines() if any(c.isalnum() for c in ln)]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return (errors or lines or [f"exit code {result.returncode}"])[-1][:300]


def run_recipes(recipes: list[str], nproc: int, config: Path, overrides: list[str], out: Path,
                console: Console, timeline: bool = True, timeout_s: int = 900) -> tuple[list[Path], dict[str, str]]:
    """Train each recipe into out/<recipe>; returns (finished run dirs, {recipe: error} of failures)."""
    if config.is_dir():
        raise UserError(f"--config {config} is a directory, not a TOML file (e.g. configs/tiny.toml)")
    if not config.is_file():
        raise UserError(f"--config {config} does not exist")
    output_dir(out, "--out")
    taken = [r for r in recipes if (out / run_name(r) / "summary.json").exists()]
    if taken:   # a run directory resumes from its checkpoints: a comparison wants fresh runs
        raise UserError(f"--out {out} already holds runs of {', '.join(taken)}; choose a new folder")
    validate(recipes, nproc, config, overrides, out, timeline)
    out.mkdir(parents=True, exist_ok=True)
    done, failed = [], {}
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("recipes", total=len(recipes))
        for spec in recipes:
            recipe, own = split_spec(spec)
            progress.update(task, description=f"training [bold]{spec}[/] ({nproc_for(spec, nproc)} proc)")
            run_dir = out / run_name(spec)
            cmd = [sys.executable, "-m", "gpu_workbench", "train", "--recipe", recipe, "--nproc",
                   str(nproc_for(spec, nproc)), "--config", str(config), "--run-dir", str(run_dir),
                   *(["--timeline"] if timeline and traces(spec) else []), *overrides, *own, "progress=false"]
            start = time.perf_counter()
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                    env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            seconds = time.perf_counter() - start
            if result.returncode == 0 and (run_dir / "summary.json").is_file():
                done.append(run_dir)
                console.print(f"  {spec}: done in {seconds:.1f}s")
            else:
                failed[spec] = _error_line(result)
                console.print(f"  [red]{spec}: failed[/] ({failed[spec]})")
            progress.advance(task)
    return done, failed
