"""Context parallelism: sequence sharding, the log-sum-exp merge and the config checks (in-process); and,
under torchrun launches of tests/helpers/workers/cp_checks.py (2 ranks, then 3: an odd C), ring attention's
forward and backward equal single-process kernels.attention, causal blocks balanced under headtail and not
under none, bytes sent as counted by hand, a GPT with context_parallel.apply equal to the unsharded GPT,
and `--recipe ddp cp.degree=2` (trained in the 2-rank launch) equal to `single` per step and in its final
parameters; a third, 4-rank launch trains fsdp dp2 x cp2, ddp cp2 x tp2 (gpt2; llama with sequence
parallelism) and fsdp cp2 x tp2 (llama, sequence parallelism), each equal to `single` per step, their
summary's cp and tp parts measured = predicted.
Budget: about 32 s for the file on 2 CPU cores (2026-12-03; the cp x tp runs add about 10 s of it)."""

from __future__ import annotations

import json

import pytest
import torch

from gpu_workbench import kernels
from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.primitives import context_parallel as cp
from gpu_workbench.parallel.recipes import resolve
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.rundir import read_evals
from tests.helpers.cli import WORKERS, torchrun
from tests.helpers.runs import TINY, assert_matches_single, summary, train_single
from tests.helpers.workers.cp_checks import RING_CASES

COMMON = ["steps=5", "progress=false", "checkpoint.every=0", "checkpoint.save_final=true", "optim.warmup_steps=2"]
# the single runs they are compared with: gpt2 (tiny.toml) and llama (rotary positions, GQA 4/2), with the
# held-out loss every 2 steps
SINGLE = {"single": [], "single-llama": ["model.arch=llama", "model.n_kv_heads=2", "eval.every=2"]}
DDP_CP = {"ddp-cp-headtail": (["recipe=ddp", "cp.degree=2"], "single"),
          "ddp-cp-none": (["recipe=ddp", "cp.degree=2", "cp.load_balance=none"], "single"),
          "ddp-cp-llama": (["recipe=ddp", "cp.degree=2", *SINGLE["single-llama"]], "single-llama"),
          "fsdp-cp-headtail": (["recipe=fsdp", "cp.degree=2"], "single")}
# trained in a 4-rank launch (dp 2 x cp 2; dp 1 x cp 2 x tp 2, gpt2, and llama with sequence parallelism):
# (overrides, the single run)
CP_TP = ["recipe=ddp", "cp.degree=2", "tp.degree=2"]
CP4 = {"fsdp-cp-dp2": (["recipe=fsdp", "cp.degree=2"], "single"),
       "ddp-cp-tp": (CP_TP, "single"),
       "ddp-cp-tp-sp-llama": ([*CP_TP, "tp.sequence_parallel=true", *SINGLE["single-llama"]], "single-llama"),
       # fsdp sharded over dp_shard x cp (one mesh dimension) beside tp: refused before `parallelize`
       "fsdp-cp-tp-sp-llama": (["recipe=fsdp", "cp.degree=2", "tp.degree=2", "tp.sequence_parallel=true",
                                *SINGLE["single-llama"]], "single-llama")}
# (world size, dp) each run reports
WORLD = {**{n: (2, 1) for n in DDP_CP}, "fsdp-cp-dp2": (4, 2), "ddp-cp-tp": (4, 1), "ddp-cp-tp-sp-llama": (4, 1),
         "fsdp-cp-tp-sp-llama": (4, 1)}


# ---- in-process --------------------------------------------------------------------------------
def test_shard_positions_headtail_and_none():
    assert cp.shard_positions(8, 0, 2, "headtail").tolist() == [0, 1, 6, 7]
    assert cp.shard_positions(8, 1, 2, "headtail").tolist() == [2, 3, 4, 5]
    assert cp.shard_positions(12, 1, 3, "headtail").tolist() == [2, 3, 8, 9]
    assert cp.shard_positions(12, 2, 3, "none").tolist() == [8, 9, 10, 11]


@pytest.mark.parametrize("degree, balance", [(2, "headtail"), (3, "headtail"), (3, "none"), (4, "none")])
def test_shards_partition_the_sequence(degree, balance):
    shards = [cp.shard_positions(24, r, degree, balance) for r in range(degree)]
    assert all(len(s) == 24 // degree for s in shards)
    assert sorted(torch.cat(shards).tolist()) == list(range(24))


def test_shard_sequence_takes_the_positions():
    x = torch.arange(2 * 8).reshape(2, 8)
    pos = cp.shard_positions(8, 0, 2, "headtail")
    assert cp.shard_sequence(x, pos).tolist() == [[0, 1, 6, 7], [8, 9, 14, 15]]


@pytest.mark.parametrize("seq_len, degree, balance, needs", [(10, 3, "headtail", "6"), (10, 4, "none", "4"),
                                                              (6, 2, "headtail", "4")])
def test_bad_seq_len_is_one_line_naming_it(seq_len, degree, balance, needs):
    with pytest.raises(UserError, match=rf"model.seq_len \({seq_len}\) must be divisible by {needs} \(cp.degree"):
        cp.shard_positions(seq_len, 0, degree, balance)


def test_bad_load_balance_is_named():
    with pytest.raises(UserError, match="cp.load_balance must be one of headtail, none"):
        cp.shard_positions(8, 0, 2, "zigzag")


def test_merge_of_two_key_blocks_is_the_whole_attention():
    """Keys in two blocks merged into an empty start (lse -inf): a full block, then the causal diagonal one."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 6, 16, generator=gen)
    k, v = torch.randn(1, 3, 9, 16, generator=gen), torch.randn(1, 3, 9, 16, generator=gen)
    out = torch.zeros(1, 3, 6, 16)
    lse = torch.full((1, 3, 6), float("-inf"))
    for keys, causal in ((slice(0, 3), False), (slice(3, 9), True)):   # causal, N = M = 6: the first rows see 1 key
        o, l = kernels.attention_forward(q, k[:, :, keys], v[:, :, keys], causal=causal, backend="torch")
        out, lse = cp.merge(out, lse, o, l)
    visible = torch.arange(9)[None, :] <= torch.arange(6)[:, None] + 3
    s = (q @ k.transpose(-1, -2) / 4).masked_fill(~visible, float("-inf"))
    assert torch.allclose(out, torch.softmax(s, -1) @ v, atol=1e-6)
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-6)


def test_cp_groups_are_the_ranks_that_differ_in_cp_alone():
    from gpu_workbench.parallel.runtime.dims import ParallelDims

    assert cp.cp_members(ParallelDims(world_size=4, dp_replicate=2, cp=2)) == [[0, 1], [2, 3]]
    assert cp.cp_members(ParallelDims(world_size=6, dp_replicate=2, cp=3)) == [[0, 1, 2], [3, 4, 5]]
    assert cp.cp_members(ParallelDims(world_size=8, dp_replicate=2, cp=2, tp=2)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    # ddp x cp x tp's gradient average: the ranks with one tp coordinate
    dims = ParallelDims(world_size=8, dp_replicate=2, cp=2, tp=2)
    assert dims.groups(("dp_replicate", "cp")) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_config_accepts_cp_for_ddp_and_fsdp_only_and_cp_tp_for_both():
    dims = resolve(RunConfig.from_toml(TINY, ["recipe=ddp", "cp.degree=2"]), 4)
    assert (dims.cp, dims.dp_replicate) == (2, 2)
    dims = resolve(RunConfig.from_toml(TINY, ["recipe=fsdp", "cp.degree=2"]), 4)
    assert (dims.cp, dims.dp_shard) == (2, 2)
    with pytest.raises(UserError, match="cp.degree = 2 does not work with recipe=zero2: context parallelism composes "
                                        "only with --recipe ddp and fsdp"):
        resolve(RunConfig.from_toml(TINY, ["recipe=zero2", "cp.degree=2"]), 2)
    dims = resolve(RunConfig.from_toml(TINY, ["recipe=fsdp", "cp.degree=2", "tp.degree=2"]), 8)
    assert (dims.dp_shard, dims.cp, dims.tp) == (2, 2, 2)
    dims = resolve(RunConfig.from_toml(TINY, ["recipe=ddp", "cp.degree=2", "tp.degree=2"]), 4)
    assert (dims.dp_replicate, dims.cp, dims.tp) == (1, 2, 2)


def test_sequence_parallel_must_split_each_cp_shard():
    """SP splits a cp rank's seq_len / cp.degree positions: 36 / 2 = 18 does not split over tp.degree 4
    (36 alone would)."""
    sp = ["recipe=ddp", "model.seq_len=36", "tp.degree=4", "tp.sequence_parallel=true"]
    assert resolve(RunConfig.from_toml(TINY, sp), 4).tp == 4
    with pytest.raises(UserError, match=r"model.seq_len / cp.degree \(36 / 2 = 18\) must be divisible by tp.degree "
                                        r"\(4\) with tp.sequence_parallel = true"):
        resolve(RunConfig.from_toml(TINY, [*sp, "cp.degree=2"]), 8)


@pytest.mark.parametrize("overrides, chunks", [(["cp.degree=3"], 6), (["cp.degree=3", "cp.load_balance=none"], 3)])
def test_config_refuses_a_seq_len_the_chunks_do_not_divide(overrides, chunks):
    with pytest.raises(UserError, match=rf"model.seq_len \(32\) must be divisible by {chunks} with cp.degree = 3"):
        RunConfig.from_toml(TINY, ["recipe=ddp", *overrides])
    assert RunConfig.from_toml(TINY, ["recipe=ddp", "model.seq_len=36", *overrides]).cp.degree == 3


# ---- under torchrun ----------------------------------------------------------------------------
def _launch(nproc: int, out, runs=()) -> dict:
    torchrun(WORKERS / "cp_checks.py", nproc, str(out), json.dumps(list(runs)), timeout=300)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    """{"single" and each DDP_CP name: run_dir, "checks": the ring and model checks of both launches}."""

    root = tmp_path_factory.mktemp("cp")
    dirs = {name: root / name for name in [*SINGLE, *DDP_CP, *CP4]}
    for name, overrides in SINGLE.items():
        train_single(dirs[name], [*COMMON, *overrides])
    runs = [(TINY, [*COMMON, *o, f"run_dir={dirs[n]}"]) for n, (o, _) in DDP_CP.items()]
    checks = _launch(2, root / "c2.json", runs)
    checks.update(_launch(3, root / "c3.json"))
    _launch(4, root / "c4.json", [(TINY, [*COMMON, *o, f"run_dir={dirs[n]}"]) for n, (o, _) in CP4.items()])
    return {**dirs, "checks": checks}


@pytest.fixture(scope="module")
def checks(cp_runs):
    return cp_runs["checks"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*DDP_CP, *CP4])
def test_ddp_cp_matches_single(name, cp_runs):
    """Per-step losses, clipping norms, held-out losses (llama) and final parameters of ddp and fsdp with
    cp.degree = 2 equal single's."""
    overrides, single = {**DDP_CP, **CP4}[name]
    assert_matches_single(cp_runs[name], cp_runs[single], steps=5)
    assert bool(read_evals(cp_runs[name])) == ("eval.every=2" in overrides)   # llama's held-out losses compared
    s = summary(cp_runs[name])
    world, dp = WORLD[name]
    assert s["parallel_dims"]["cp"] == 2 and s["dp"] == dp and s["world_size"] == world, s["parallel_dims"]
    _check_cp_part(s, cp_runs[name], "cp.load_balance=none" in overrides)
    if "tp.degree=2" in overrides:
        _check_tp_part(s, "tp.sequence_parallel=true" in overrides)


def _check_tp_part(s: dict, sp: bool) -> None:
    """ddp x cp x tp: TP's collectives, measured, equal the prediction from the cp shard's shapes, and the
    gradient average over dp_replicate x cp ran once per step."""
    ops = s["tp_collectives_per_step_measured"]
    assert s["tp_bytes_per_step_per_rank_measured"] == s["tp_bytes_per_step_per_rank_predicted"] > 0, ops
    assert "seq_len/2 (cp.degree)" in s["tp_predicted_formula"] and s["tp_sequence_parallel"] == sp, s
    assert ("reduce_scatter_tensor" in ops) == sp, ops
    if s["recipe"] == "ddp":   # fsdp's gradients go through FSDP2's reduce-scatter, which has no counter
        assert s["comm_ops"] == 5 and s["bytes_communicated"] > 0, s


def _check_cp_part(s: dict, run_dir, contiguous: bool) -> None:
    """One training step's forward blocks per rank: per attention call 2C+1 = 5 (headtail) or cp rank + 1
    (none, cp rank = rank % 2); the ring bytes measured equal the prediction from the shapes."""
    cp = s   # flat(): the cp part's fields at the top level
    n_layers = json.loads((run_dir / "config.json").read_text())["model"]["n_layers"]
    calls, tp = s["accum_steps"] * n_layers, s["parallel_dims"]["tp"]
    want = [calls * ((r // tp) % 2 + 1 if contiguous else 5) for r in range(s["world_size"])]   # tp fastest
    assert cp["cp_attention_blocks_per_rank"] == want, (cp, want)
    assert cp["cp_ring_bytes_per_step_per_rank_measured"] == cp["cp_ring_bytes_per_step_per_rank_predicted"] > 0, cp


CASES = [(c, case) for c, cases in RING_CASES.items() for case in cases]
IDS = [f"C{c}-{case[0]}" for c, case in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("c, case", CASES, ids=IDS)
def test_ring_matches_single_process_attention(c, case, checks):
    errors = checks[f"C{c}-{case[0]}"]["errors"]
    assert set(errors) == {"out", "dq", "dk", "dv"} and all(e < 1e-5 for e in errors.values()), errors


@pytest.mark.slow
@pytest.mark.parametrize("c, case", CASES, ids=IDS)
def test_blocks_computed_per_rank(c, case, checks):
    """causal headtail: every rank 2C+1 blocks (3 on the diagonal step, 2 on each other); causal none: rank
    r computes r+1 (the imbalance); non-causal: every chunk pair of every step. Backward as forward."""
    _, _, _, _, _, _, causal, balance, _ = case
    stats = checks[f"C{c}-{case[0]}"]["stats"]
    blocks = [s["blocks_forward"] for s in stats]
    assert blocks == [s["blocks_backward"] for s in stats]
    if causal and balance == "headtail":
        assert max(blocks) - min(blocks) <= 1 and blocks == [2 * c + 1] * c, blocks
    elif causal:
        assert blocks == list(range(1, c + 1)), blocks
    else:
        assert blocks == [c * (4 if balance == "headtail" else 1)] * c, blocks


@pytest.mark.slow
@pytest.mark.parametrize("c, case", CASES, ids=IDS)
def test_bytes_sent_around_the_ring(c, case, checks):
    """Forward: local K and V (fp32) passed on C-1 times; backward: again, plus dK and dV (fp32) C times."""
    _, b, _, hkv, t, d, _, _, _ = case
    got = checks[f"C{c}-{case[0]}"]
    kv = 2 * b * hkv * (t // c) * d * 4
    for s in got["stats"]:
        assert (s["transfers_forward"], s["transfers_backward"]) == (c - 1, c)
        assert s["bytes_sent_forward"] == (c - 1) * kv, s
        assert s["bytes_sent_backward"] == (c - 1) * kv + c * kv, s
    assert got["predicted_bytes"] == [(c - 1) * kv, (2 * c - 1) * kv]


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"C{c}-model-{b}" for c in RING_CASES for b in ("headtail", "none")])
def test_gpt_with_ring_attention_matches_the_unsharded_one(name, checks):
    got = checks[name]
    assert abs(got["loss"] - got["ref_loss"]) / got["ref_loss"] < 1e-6, got
    assert len(got["grad_rel"]) > 10
    bad = {n: r for n, r in got["grad_rel"].items() if not r < 1e-5}
    assert not bad, f"gradients off the unsharded model's: {bad}"
