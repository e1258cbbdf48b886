"""The dry run of configs/llama-70b.toml on 512 fake ranks (fsdp, dp_shard 64 x tp 8), in this process: the
acceptance asks for under a minute on the 2-core box. One round (it lays out two ranks of a 70.6B-parameter
model on the meta device). Marked `timing`: `make bench` runs it, `make test` does not."""

from __future__ import annotations

import pytest

from tests.helpers.cli import ROOT


@pytest.mark.timing
def test_dry_run_llama_70b_on_512_ranks(benchmark):
    from gpu_workbench.parallel import RunConfig
    from gpu_workbench.parallel.tools.dry_run import dry_run

    cfg = RunConfig.from_toml(ROOT / "configs" / "llama-70b.toml", ["recipe=fsdp", "tp.degree=8"])
    result = benchmark.pedantic(lambda: dry_run(cfg, 512), rounds=1, iterations=1)
    assert len(result.by_rank) == 512 and result.n_params > 70e9
