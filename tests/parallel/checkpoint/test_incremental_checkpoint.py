"""Incremental checkpoints (parallel/checkpoint/incremental.py): a save writes only the tensors that changed,
a full base every checkpoint.full_every saves, a load reads each tensor from the folder that holds it.

With optim.frozen the frozen weights (no optimizer state) never change, so after the base only the rest is
written. Launches, once for the module: ddp x2 incremental killed at step 6 (CLI); one torchrun of six runs
(ddp x2 full checkpoints, the killed run resumed, ddp x2 incremental with async saves, fsdp x2 incremental
to step 8, fsdp runs started from its step-6 delta and from ddp's step-7 delta); single in this process
for the retention and folder checks.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from gpu_workbench.parallel.runtime.errors import UserError
from tests.helpers.runs import TINY, final_params, losses, summary, torchrun, wb

pytestmark = pytest.mark.slow

FROZEN = 'optim.frozen=["tok_emb", "blocks.0", "blocks.1"]'
BASE = ["progress=false", "steps=8", "model.n_layers=3", "checkpoint.every=1", "checkpoint.keep=2",
        "checkpoint.save_final=true", "optim.warmup_steps=2", FROZEN]
INCREMENTAL = ["checkpoint.incremental=true", "checkpoint.full_every=4"]


def _meta(run, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:06d}" / "meta.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    dirs = {name: root / name for name in ("full", "inc", "async", "fsdp", "fsdp6", "fsdp7")}
    killed = wb("train", "--recipe", "ddp", "--nproc", "2", "--config", TINY, *BASE, *INCREMENTAL,
                f"run_dir={dirs['inc']}", "fault.kill_rank=1", "fault.at_step=6")
    assert killed.returncode != 0, killed.stderr[-2000:]
    torchrun(2, [(TINY, [*BASE, "recipe=ddp", f"run_dir={dirs['full']}"]),
                 (TINY, [*BASE, *INCREMENTAL, "recipe=ddp", f"run_dir={dirs['inc']}"]),
                 (TINY, [*BASE, *INCREMENTAL, "recipe=ddp", "checkpoint.async_save=true", f"run_dir={dirs['async']}"]),
                 (TINY, [*BASE, *INCREMENTAL, "recipe=fsdp", "checkpoint.keep=8", f"run_dir={dirs['fsdp']}"]),
                 (TINY, [*BASE, *INCREMENTAL, "recipe=fsdp", f"run_dir={dirs['fsdp6']}",
                         f"checkpoint.load_from={dirs['fsdp'] / 'checkpoints' / 'step_000006'}"]),
                 (TINY, [*BASE, *INCREMENTAL, "recipe=fsdp", f"run_dir={dirs['fsdp7']}",
                         f"checkpoint.load_from={dirs['inc'] / 'checkpoints' / 'step_000007'}"])])
    return dirs


def test_killed_incremental_run_equals_full_checkpoints_and_writes_less(runs):
    full, inc = runs["full"], runs["inc"]
    assert summary(inc)["resumed_from_step"] == 6
    assert losses(inc) == losses(full)   # bitwise: the same layout, each tensor read back exactly
    a, b = final_params(inc), final_params(full)
    assert all(torch.equal(a[k], b[k]) for k in b)
    written, everything = summary(inc)["checkpoint_bytes_written"], summary(full)["checkpoint_bytes_written"]
    assert written <= 0.8 * everything, (written, everything)
    # the whole run's total, both segments (the resumed one alone wrote only steps 7 and 8), from the files
    assert written == _meta(inc, 8)["bytes_written_total"]
    resumed_segment = _meta(inc, 7)["bytes_written"] + _meta(inc, 8)["bytes_written"]
    assert written > 2 * _meta(inc, 5)["bytes_written"] + resumed_segment


def test_a_delta_after_the_resume_builds_on_the_chain_before_it(runs):
    inc = runs["inc"]
    step8 = _meta(inc, 8)
    assert (step8["chain"], _meta(inc, 5)["chain"]) == (3, 0)   # saves 5 (base), 6, 7 | kill | 8
    homes = {e["in"] for e in step8["tensors"].values()}
    assert homes == {"step_000005", "step_000008"}   # frozen: the base; the rest: written at step 8
    frozen_home = {k: e["in"] for k, e in step8["tensors"].items() if k.startswith("model.blocks.0.")}
    assert set(frozen_home.values()) == {"step_000005"}
    # keep=2 keeps 7 and 8, and the base they read from
    assert sorted(p.name for p in (inc / "checkpoints").iterdir()) == ["step_000005", "step_000007", "step_000008"]


def test_incremental_and_async_together_on_two_ranks(runs):
    from gpu_workbench.parallel.tools.describe_checkpoint import verify_all

    both, full = runs["async"], runs["full"]
    assert losses(both) == losses(full)
    assert [problem for _, problem in verify_all(both)] == [None, None, None]
    assert _meta(both, 8)["chain"] == 3
    assert summary(both)["checkpoint_bytes_written"] <= 0.8 * summary(full)["checkpoint_bytes_written"]


def test_fsdp_incremental_shards_match_ddp_and_a_sharded_delta_loads_back(runs):
    fsdp, full, again = runs["fsdp"], runs["full"], runs["fsdp6"]
    got, want = losses(fsdp), losses(full)
    assert len(got) == len(want) == 8 and max(abs(x - y) for x, y in zip(got, want, strict=True)) < 1e-5
    delta = _meta(fsdp, 6)
    assert delta["chain"] == 1
    written_here = [k for k, e in delta["tensors"].items() if e["in"] == "step_000006"]
    assert written_here and not any(k.startswith("model.blocks.1.") for k in written_here)
    assert any(rel.startswith("dcp/__1_") for rel in delta["files"])   # rank 1 wrote its shards
    # started from that delta (its frozen shards in step 5's folder): steps 7 and 8 as the run itself
    assert summary(again)["resumed_from_step"] == 6 and losses(again) == got[6:]
    # ddp's delta at step 7 (frozen weights in step 5's folder), resharded into fsdp: step 8 as ddp's
    resharded = losses(runs["fsdp7"])
    assert len(resharded) == 1 and abs(resharded[0] - want[7]) < 1e-5


def test_inspect_and_verify_understand_a_delta_and_its_damaged_base(runs, tmp_path):
    from gpu_workbench.parallel.tools.describe_checkpoint import inspect, verify_all

    inc = tmp_path / "copy"
    shutil.copytree(runs["inc"], inc)
    shown = "\n".join(inspect(inc / "checkpoints" / "step_000008"))   # what `wb checkpoint inspect` prints
    assert "incremental: delta 3 after its base" in shown and "read from step_000005" in shown
    assert [problem for _, problem in verify_all(inc)] == [None, None, None]
    data = next((inc / "checkpoints" / "step_000005" / "dcp").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    damaged = wb("checkpoint", "verify", str(inc))
    assert damaged.returncode != 0
    said = damaged.stdout + damaged.stderr
    assert "step_000008: damaged: it reads tensors from step_000005, which is damaged (dcp/" in said, said


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    from gpu_workbench.parallel import RunConfig, train

    run = tmp_path_factory.mktemp("incremental-single") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model: more threads only contend with the box's other jobs
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            train(RunConfig.from_toml(TINY, [*BASE, *INCREMENTAL, "recipe=single", "steps=6", "checkpoint.keep=1",
                                             f"run_dir={run}"]))
    finally:
        torch.set_num_threads(threads)
    return run


def test_retention_keeps_the_base_a_kept_delta_reads_from(single_run):
    from gpu_workbench.parallel.checkpoint import prune

    folders = lambda: sorted(p.name for p in (single_run / "checkpoints").iterdir())  # noqa: E731
    assert folders() == ["step_000005", "step_000006"]   # keep=1, but step 6 reads the frozen weights from 5
    prune(single_run, keep=1)   # a second sweep changes nothing
    assert folders() == ["step_000005", "step_000006"]


def test_a_load_reads_each_tensor_from_the_folder_its_map_names(single_run):
    from gpu_workbench.parallel.checkpoint.universal import consolidated_weights

    step6 = single_run / "checkpoints" / "step_000006"
    meta = json.loads((step6 / "meta.json").read_text())
    homes = {k[len("model."):]: e["in"] for k, e in meta["tensors"].items() if k.startswith("model.")}
    assert homes["blocks.0.attn.q.weight"] == "step_000005" and homes["blocks.2.attn.q.weight"] == "step_000006"
    weights, final = consolidated_weights(step6, tied=True), final_params(single_run)
    assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k]) for k in final)


def test_deepspeed_recipes_refuse_incremental_and_async_in_one_line():
    from gpu_workbench.parallel import RunConfig
    from gpu_workbench.parallel.recipes import resolve

    for key in ("incremental", "async_save"):
        with pytest.raises(UserError, match=f"checkpoint.{key} does not work with recipe=zero2: its state is"):
            resolve(RunConfig.from_toml(TINY, ["recipe=zero2", f"checkpoint.{key}=true"]), 2)
    with pytest.raises(UserError, match="checkpoint.full_every must be >= 1, got 0"):
        resolve(RunConfig.from_toml(TINY, ["checkpoint.full_every=0"]), 1)


def test_a_save_writes_what_changed_and_what_lived_in_the_folder_it_replaces():
    from gpu_workbench.parallel.checkpoint.incremental import plan

    previous = {"a": {"sha256": "1", "in": "step_000004"}, "b": {"sha256": "2", "in": "step_000006"},
                "c": {"sha256": "3", "in": "step_000004"}}
    hashes = {"a": "1", "b": "2", "c": "9", "d": "4", "e": None}
    write, tensors = plan(hashes, previous, "step_000006", full=False)
    assert write == {"b", "c", "d", "e"}   # b: unchanged, but its folder is the one being replaced
    assert tensors["a"] == {"sha256": "1", "in": "step_000004"} and tensors["c"]["in"] == "step_000006"
    assert plan(hashes, previous, "step_000008", full=True)[0] == set(hashes)
