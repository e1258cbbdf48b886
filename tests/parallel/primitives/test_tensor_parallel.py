"""Tensor (and sequence) parallelism matches `single`: per-step losses within 1e-5 relative and the final
gathered parameters within 1e-5, for ddp x tp (2 ranks, SP off and on; 4 ranks, dp_replicate 2),
fsdp x tp (4 ranks) and pipeline x tp (4 ranks: pp 2 x tp 2, 1f1b; gpipe with SP); the TP model alone against
the unsharded one, replicated gradients bitwise equal on every TP rank; model-state memory; TP collectives
measured vs predicted; kill and resume under fsdp x tp; resume under pipeline x tp.

Three launches in all (budget: about 90 s): one of 2 ranks (the ddp x tp runs and the unit check), one
4-rank run that is killed, and one of 4 ranks (the other runs, the resumed ones among them).
"""

from __future__ import annotations

import json
import math

import pytest

from gpu_workbench.parallel.runtime.rundir import read_metrics
from tests.helpers.cli import WORKERS, torchrun
from tests.helpers.runs import (
    TINY,
    assert_matches_single,
    final_params,
    losses,
    max_rel_diff,
    rel,
    summary,
    train_single,
    wb,
)

pytestmark = pytest.mark.slow

# tiny.toml's model (the memory acceptance is stated on it); 5 steps, a short warm-up
COMMON = ["steps=5", "progress=false", "checkpoint.every=0", "checkpoint.save_final=true", "optim.warmup_steps=2"]
RESUME = ["checkpoint.every=2", "checkpoint.keep=1"]
TWO = {"ddp-tp": ["recipe=ddp", "tp.degree=2"],
       "ddp-tp-sp": ["recipe=ddp", "tp.degree=2", "tp.sequence_parallel=true", "profiling.timeline=true"],
       "ddp-tp-nan": ["recipe=ddp", "tp.degree=2", "fault.nan_at_step=2", "checkpoint.save_final=false"]}
FOUR = {"fsdp-tp": ["recipe=fsdp", "tp.degree=2", *RESUME],
        "ddp-dp2-tp-sp": ["recipe=ddp", "tp.degree=2", "tp.sequence_parallel=true",
                          "model.activation_checkpointing=true"]}   # recomputation: more collectives, predicted
# pipeline x tp: 2 stages x 2 TP ranks, in the 4-rank launch; the 1f1b run checkpoints after 3 steps,
# a third run resumes from a copy of that checkpoint; gpipe with sequence parallelism (the activations
# between stages are then each rank's half of the sequence)
PIPE_TP = ["recipe=pipeline", "pp.degree=2", "tp.degree=2", "pp.gantt=false"]
PP_TP = {"pp-tp": [*PIPE_TP, "pp.schedule=1f1b", "checkpoint.every=3"],
         "pp-tp-sp-gpipe": [*PIPE_TP, "pp.schedule=gpipe", "tp.sequence_parallel=true"]}
EQUIVALENT = ["ddp-tp", "ddp-tp-sp", "fsdp-tp", "ddp-dp2-tp-sp", *PP_TP]


def _torchrun(nproc: int, runs: list, results=None) -> None:
    torchrun(WORKERS / "tp_checks.py", nproc, json.dumps(runs), *([str(results)] if results else []))


@pytest.fixture(scope="module")
def single(tmp_path_factory):

    run_dir = tmp_path_factory.mktemp("tp-single")
    train_single(run_dir, COMMON)
    return run_dir


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """{name: run_dir}, plus "unit": the unit check's JSON, "killed": the first attempt's CompletedProcess."""
    root = tmp_path_factory.mktemp("tp")
    dirs = {name: root / name for name in [*TWO, *FOUR, "fsdp-tp-resumed", *PP_TP, "pp-tp-resumed"]}
    _torchrun(2, [(TINY, [*COMMON, *o, f"run_dir={dirs[n]}"]) for n, o in TWO.items()], root / "unit.json")
    # rank 1 dies at step 3: the checkpoint after 2 steps is complete, the one after 4 never starts
    killed = wb("train", "--config", TINY, "--nproc", "4", "--run-dir", str(dirs["fsdp-tp-resumed"]), *COMMON,
                *FOUR["fsdp-tp"][:2], *RESUME, "fault.kill_rank=1", "fault.at_step=3")
    checkpoints = sorted(p.name for p in (dirs["fsdp-tp-resumed"] / "checkpoints").iterdir())
    runs = [(TINY, [*COMMON, *o, f"run_dir={dirs[n]}"]) for n, o in FOUR.items()]
    runs.append((TINY, [*COMMON, *FOUR["fsdp-tp"], f"run_dir={dirs['fsdp-tp-resumed']}"]))   # fault off: resumes
    runs += [(TINY, [*COMMON, *o, f"run_dir={dirs[n]}"]) for n, o in PP_TP.items()]
    runs.append(("copy", str(dirs["pp-tp"]), str(dirs["pp-tp-resumed"]), 3))
    runs.append((TINY, [*COMMON, *PP_TP["pp-tp"], f"run_dir={dirs['pp-tp-resumed']}"]))
    _torchrun(4, runs)
    return {**dirs, "unit": json.loads((root / "unit.json").read_text()), "killed": (killed, checkpoints)}


@pytest.mark.parametrize("name", EQUIVALENT)
def test_matches_single(name, single, tp_runs):
    assert_matches_single(tp_runs[name], single, steps=5)   # the clipping norm over every shard too
    s = summary(tp_runs[name])
    assert s["parallel_dims"]["tp"] == 2 and s["dp"] == s["world_size"] // (2 * s["parallel_dims"]["pp"])


@pytest.mark.parametrize("sp", [False, True])
def test_tp_model_alone_matches_the_unsharded_one(sp, tp_runs):
    got = tp_runs["unit"][f"sp={sp}"]
    assert rel(got["loss"], got["ref_loss"]) < 1e-6
    bad = {n: r for n, r in got["grad_rel"].items() if not r < 1e-5}
    assert not bad, f"gradients off the unsharded model's: {bad}"
    # replicated: pos_emb, the norms, proj's and down's biases; each bitwise the same on both TP ranks
    assert len(got["replicated_equal"]) == 1 + 2 * 2 * 2 + 2 * 2 + 2, got["replicated_equal"]
    assert all(got["replicated_equal"].values()), got["replicated_equal"]


def _sharded_by_hand(m) -> int:
    """Ψs for tiny.toml: per block q, k, v, proj (4 C^2), up's weight and bias, down's weight; the tied embedding."""
    c, f = m.d_model, 4 * m.d_model
    return m.n_layers * (4 * c * c + c * f + f + f * c) + m.vocab_size * c


def test_memory_tp2_at_most_055x_single(single, tp_runs):
    from gpu_workbench.parallel import RunConfig

    s, ref = summary(tp_runs["ddp-tp"]), summary(single)
    ratio = s["model_state_bytes_per_rank"] / ref["model_state_bytes_per_rank"]
    assert ratio <= 0.55, f"tp.degree=2 holds {ratio:.3f}x single's model state"
    m = RunConfig.from_toml(TINY).model
    psi_s = _sharded_by_hand(m)
    assert s["predicted_model_state_bytes_per_rank"] == 16 * (psi_s // 2 + s["n_params"] - psi_s)
    assert "Ψs/T+Ψr" in s["predicted_formula"]
    assert s["model_state_bytes_per_rank"] == s["predicted_model_state_bytes_per_rank"]   # fp32, nothing to round
    fsdp = summary(tp_runs["fsdp-tp"])   # and sharded once more over dp_shard = 2
    assert abs(fsdp["model_state_bytes_per_rank"] - s["model_state_bytes_per_rank"] / 2) <= \
        0.1 * s["model_state_bytes_per_rank"] / 2


@pytest.mark.parametrize("name", EQUIVALENT)   # pipeline: rank 0's share, its first stage's
def test_tp_collectives_measured_and_predicted(name, tp_runs):
    s = summary(tp_runs[name])
    ops = s["tp_collectives_per_step_measured"]
    assert s["tp_bytes_per_step_per_rank_measured"] == s["tp_bytes_per_step_per_rank_predicted"], (name, ops)
    assert s["tp_degree"] == 2 and "M = micro_batch x seq_len x d_model" in s["tp_predicted_formula"]
    if "sp" in name:
        assert ops["reduce_scatter_tensor"] > 0 and ops["all_gather_into_tensor"] > 0, ops
    else:
        assert set(ops) == {"all_reduce"}, ops


def test_tp_collectives_on_every_ranks_timeline(tp_runs):
    """--timeline: each TP collective DTensor issued is a "tp.<collective>" span (with its bytes) on every
    rank, as many per step as the step's measured count, and the waits for them are "tp.wait" spans."""
    import json
    from collections import Counter

    run = tp_runs["ddp-tp-sp"]
    s = summary(run)
    events = json.loads((run / "trace.json").read_text())["traceEvents"]
    spans = Counter((e["pid"], e["name"]) for e in events if e.get("ph") == "X" and e["name"].startswith("tp."))
    for rank in (0, 1):
        for op, per_step in s["tp_collectives_per_step_measured"].items():
            assert spans[(rank, f"tp.{op}")] == per_step * s["steps"], (rank, op, spans)
        assert spans[(rank, "tp.wait")] > 0


def test_data_parallel_all_reduce_by_hand(tp_runs):
    """ddp x tp on 4 ranks: the local gradient shards (Ψs/2 + Ψr floats) all-reduced once per step."""
    s = summary(tp_runs["ddp-dp2-tp-sp"])
    local_bytes = s["model_state_bytes_by_rank"][0]["grads"]
    assert s["comm_ops"] == 5 and s["bytes_communicated"] == 2 * local_bytes * 4 * 5


def test_nan_gradient_skips_the_step_on_every_rank(tp_runs):
    """fault.nan_at_step: rank 0's gradient shard turns NaN; the global norm is NaN on every rank, so every
    rank skips the same step (nan_policy = 'skip') and training goes on with finite losses."""
    records = read_metrics(tp_runs["ddp-tp-nan"])
    assert [m["applied"] for m in records] == [True, True, False, True, True], records
    assert math.isnan(records[2]["grad_norm"]) and all(math.isfinite(m["loss"]) for m in records)
    assert summary(tp_runs["ddp-tp-nan"])["skipped_steps"] == 1


def test_kill_and_resume_fsdp_tp(tp_runs):
    killed, checkpoints = tp_runs["killed"]
    assert killed.returncode != 0 and checkpoints == ["step_000002"], (killed.stderr[-2000:], checkpoints)
    resumed, clean = tp_runs["fsdp-tp-resumed"], tp_runs["fsdp-tp"]
    assert summary(resumed)["resumed_from_step"] == 2
    assert max_rel_diff(final_params(resumed), final_params(clean)) < 1e-6
    assert losses(resumed) == pytest.approx(losses(clean), rel=1e-6)


def test_pipeline_tp_stage_memory_and_resume(tp_runs):
    """pp = 2 x tp = 2: each stage-rank holds Ψs/T + Ψr of its stage (tiny.toml: one block per stage; the
    embeddings on stage 0, ln_f and the tied head's copy on stage 1); the universal checkpoint (every
    (stage-rank, tp-rank) its own shards in one DCP folder, a trainer file per rank); resumed from the step-3
    checkpoint, the same steps 3 and 4 and the same end state."""
    from gpu_workbench.parallel import RunConfig

    clean, resumed = tp_runs["pp-tp"], tp_runs["pp-tp-resumed"]
    s, m = summary(clean), RunConfig.from_toml(TINY).model
    c = m.d_model
    first = (4 * c * c + 8 * c * c + 4 * c + m.vocab_size * c) // 2 + 6 * c + m.seq_len * c
    assert s["predicted_model_state_bytes_per_rank"] == 16 * first and "(Ψs/T+Ψr)_stage" in s["predicted_formula"]
    assert s["model_state_bytes_per_rank"] == s["predicted_model_state_bytes_per_rank"]   # fp32: measured = predicted
    assert sorted(p.name for p in (clean / "checkpoints" / "step_000003").iterdir()) == [
        "dcp", "meta.json", *(f"trainer_rank{r}.pt" for r in range(4))]
    assert summary(resumed)["resumed_from_step"] == 3
    assert losses(resumed) == pytest.approx(losses(clean)[3:], rel=1e-6)
    assert max_rel_diff(final_params(resumed), final_params(clean)) < 1e-6
