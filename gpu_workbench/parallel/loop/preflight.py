"""The checks a run can fail before its first step, run once in the process that launches the workers.

    begin = preflight(cfg, world_size)   # resolve, then the run directory's resume / checkpoint.load_from
    os.environ[handed.ENV] = handed.encode(begin, run_dir)   # the workers take it instead of verifying again

A launcher (`wb train --nproc N` under torchrun, `--launcher ray`) calls this under its RunLock (which
refuses a file or a folder of the user's own first), before any worker starts,
so a mistake is one `wb: error:` line and exit 2 instead of N copies and a launcher's traceback. The
workers' rank 0 takes the launcher's plan (checkpoint/handed.py) while the run directory's checkpoints are
as the launcher saw them, re-checking its fingerprint at the real world size; otherwise (a restart after a
new checkpoint landed) it plans again with the same functions.
"""

from __future__ import annotations

from pathlib import Path

from gpu_workbench.parallel import recipes
from gpu_workbench.parallel.checkpoint.start import Start, check_at, decide
from gpu_workbench.parallel.runtime import metrics_log
from gpu_workbench.parallel.runtime.rundir import resolve_run_dir


def preflight(cfg, world_size: int | range) -> Start:
    """Config, recipe and layout (recipes.resolve); then where the run would start: a resume whose
    fingerprint (model, seed, arch, layout) does not fit, a bad checkpoint.load_from, a damaged
    metrics.jsonl are refused here (UserError). Writes nothing. `world_size`: a range for an elastic job,
    which may run at any of its sizes: its checkpoint is verified once and must fit each. Returns the plan
    (handed to the workers: checkpoint/handed.py)."""
    sizes = [world_size] if isinstance(world_size, int) else list(world_size)
    for size in sizes:
        recipes.resolve(cfg, size)
    run_dir = resolve_run_dir(cfg)   # a file there, a foreign folder: refused by RunLock, taken first
    recipe = recipes.get(cfg.recipe)
    # no process group here: decide is rank 0's plan, its refusal raised
    begin = decide(Path(run_dir), cfg, sizes[0], True, recipe.checkpoint_format, recipe.checkpoint_globals())
    for size in sizes[1:]:
        check_at(begin, cfg, size, recipe.checkpoint_format)
    if begin.how == "resume":
        metrics_log.check(run_dir)   # its note (a torn line) is rank 0's to print
    return begin
