"""`wb train --dry-run`: a layout laid out on fake ranks in one process (parallel/tools/dry_run.py) holds per rank
the bytes the real run measured, and counts the TP and DDP bytes per step the real run counted: ddp, fsdp,
ddp x tp (dp 2 x tp 2), fsdp x tp, the pipeline (pp 4) and pp 2 x dp 2, all on 4 ranks in one launch, 2
steps each. zero2
(DeepSpeed) is refused in one line, as is a layout a real launch refuses, with the launch's own line."""

from __future__ import annotations

import json

import pytest

from tests.helpers.dry_checks import assert_dry_run_matches
from tests.helpers.runs import TINY, torchrun

SMALL = ["steps=2", "progress=false", "checkpoint.every=0", "model.d_model=64", "model.n_layers=4",
         "global_batch=8", "micro_batch=2", "optim.warmup_steps=1", "pp.gantt=false"]
FOUR = {"ddp": ["recipe=ddp"], "fsdp": ["recipe=fsdp"], "ddp-tp": ["recipe=ddp", "tp.degree=2"],
        "fsdp-tp": ["recipe=fsdp", "tp.degree=2"], "pipeline": ["recipe=pipeline", "pp.schedule=1f1b"],
        "pp-dp": ["recipe=pipeline", "pp.degree=2"]}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    torchrun(4, [(TINY, [*SMALL, *o, f"run_dir={root / n}"]) for n, o in FOUR.items()])
    return root


@pytest.mark.parametrize("name", list(FOUR))
def test_dry_run_equals_the_real_run(name, real_runs):
    assert_dry_run_matches(real_runs / name)


def test_cli_dry_run_writes_the_summary_keys(cli, tmp_path):
    out = tmp_path / "dry.json"
    done = cli("train", "--dry-run", "--nproc", "8", "--config", TINY, "recipe=fsdp", "tp.degree=2",
               "global_batch=16", "--json", str(out))
    assert done.returncode == 0, done.stderr
    got = json.loads(out.read_text())
    assert got["parallel_dims"]["dp_shard"] == 4 and len(got["model_state_bytes_by_rank"]) == 8
    assert set(got["model_state_bytes_by_rank"][0]) == {"params", "grads", "optimizer", "total"}
    assert got["tp"]["tp_bytes_per_step_per_rank_measured"] > 0 and "rank 0" in done.stdout


@pytest.mark.parametrize("args, line", [
    (["--nproc", "2", "recipe=zero2"], "--dry-run does not cover recipe=zero2: DeepSpeed's engine"),
    (["--nproc", "3", "recipe=ddp", "tp.degree=2"], "tp.degree 2 does not divide world size (--nproc) 3"),
])
def test_refusals_are_one_line(args, line, cli):
    done = cli("train", "--dry-run", "--config", TINY, *args)
    assert done.returncode == 2 and done.stderr.strip() == f"wb: error: {line}" or line in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    if "tp.degree" in line:   # the same line a real launch prints
        real = cli("train", "--nproc", "3", "--config", TINY, "recipe=ddp", "tp.degree=2")
        assert real.returncode == 2 and real.stderr == done.stderr
