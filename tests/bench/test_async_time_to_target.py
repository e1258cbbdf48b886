"""Async vs sync SGD with a straggler: wall seconds to tiny.toml's target loss, ddp vs async-ps.

4 workers, worker 3 slowed 3x, 36 steps of global batch 16, async-ps at staleness 4 (BENCHMARKS.md,
"Async vs sync SGD"; the issue's target is async <= 0.67x ddp). A timing on whatever cores the box
has, so it is recorded, not asserted: `make bench` (`--benchmark-enable`) runs one ddp torchrun launch
and one async-ps run and puts both times to target and their ratio in the row's extra_info
(`--benchmark-json`). Under `--benchmark-disable` (the normal suite) it is skipped: what the two runs
must get right is checked by tests/parallel/recipes/test_async_sgd.py::test_straggler_ddp_and_async_reach_the_target.
"""

from __future__ import annotations

import json

import pytest

from gpu_workbench.parallel import RunConfig, train
from gpu_workbench.parallel.runtime.local_ray import start_local_ray
from tests.helpers.runs import TINY, summary, torchrun

pytestmark = pytest.mark.slow

COMMON = ["progress=false", "checkpoint.every=0", "global_batch=16", "micro_batch=4", "optim.warmup_steps=3",
          "steps=36", "straggler.rank=3", "straggler.factor=3", "log_every=1"]


def test_straggler_async_vs_sync_time_to_target(benchmark, tmp_path):
    if benchmark.disabled:
        pytest.skip("a timing: runs under `make bench` (--benchmark-enable)")
    import ray

    benchmark.group = "async vs sync SGD, 3x straggler (4 workers)"
    ddp_dir, ps_dir = tmp_path / "ddp", tmp_path / "ps"
    started = not ray.is_initialized()
    if started:
        start_local_ray(2, log_to_driver=False)
    try:
        def both():
            torchrun(4, [(TINY, [*COMMON, "recipe=ddp", f"run_dir={ddp_dir}"])])
            return train(RunConfig.from_toml(TINY, [*COMMON, "recipe=async-ps", "ps.staleness=4",
                                                    f"run_dir={ps_dir}"]), 4)

        ps = benchmark.pedantic(both, rounds=1, iterations=1)
    finally:
        if started:
            ray.shutdown()
    ddp = summary(ddp_dir)
    # without a time to target there is no figure to record: that is a failure, not a slow run
    assert ddp["time_to_target_s"] is not None and ps["time_to_target_s"] is not None, (ddp, ps)
    result = {"ddp_time_to_target_s": ddp["time_to_target_s"], "async_time_to_target_s": ps["time_to_target_s"],
              "ratio": ps["time_to_target_s"] / ddp["time_to_target_s"], "target_loss": ps["target_loss"],
              "async_staleness": ps["staleness_histogram"], "ddp_final_loss": ddp["final_loss"],
              "async_final_loss": ps["final_loss"]}
    benchmark.extra_info.update(result)
    print("\nstraggler comparison (worker 3 of 4 slowed 3x): " + json.dumps(result))
