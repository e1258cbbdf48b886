"""The checks a run can fail before its first step, run once in the process that launches the workers.

    dims = preflight(cfg, world_size)   # resolve, then the run directory's resume / checkpoint.load_from

A launcher (`wb train --nproc N` under torchrun, `--launcher ray`) calls this under its RunLock (which
refuses a file or a folder of the user's own first), before any worker starts,
so a mistake is one `wb: error:` line and exit 2 instead of N copies and a launcher's traceback. The
workers check again (Trainer._setup) with the same functions: the run directory may change in between.
"""

from __future__ import annotations

from pathlib import Path

from gpu_workbench.parallel import recipes
from gpu_workbench.parallel.checkpoint.start import decide
from gpu_workbench.parallel.runtime import metrics_log
from gpu_workbench.parallel.runtime.rundir import resolve_run_dir


def preflight(cfg, world_size: int):
    """Config, recipe and layout (recipes.resolve); then where the run would start: a resume whose
    fingerprint (model, seed, arch, layout) does not fit, a bad checkpoint.load_from, a damaged
    metrics.jsonl are refused here (UserError). Writes nothing. Returns the ParallelDims."""
    dims = recipes.resolve(cfg, world_size)
    run_dir = resolve_run_dir(cfg)   # a file there, a foreign folder: refused by RunLock, taken first
    recipe = recipes.get(cfg.recipe)
    # no process group here: decide is rank 0's plan, its refusal raised
    begin = decide(Path(run_dir), cfg, world_size, True, recipe.checkpoint_format, recipe.checkpoint_globals())
    if begin.how == "resume":
        metrics_log.check(run_dir)   # its note (a torn line) is rank 0's to print
    return dims
