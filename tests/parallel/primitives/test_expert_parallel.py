"""Expert parallelism (parallel/primitives/expert_parallel.py) equals `single` per step: a dropless llama MoE under
ep=2 with ddp x2 and fsdp x2, and under zero2 x2 without ep (one 2-rank launch), fsdp x4 with ep=2 and ddp x2 x tp=2
and fsdp x2 x tp=2 with ep=2 (one 4-rank launch). Losses (with the routers' aux and z losses), clipping norms,
held-out losses, final parameters. Universal checkpoints reshard the experts: fsdp ep=2 starts from single's
step 1, single from ddp ep=2's."""

from pathlib import Path

import pytest

from tests.helpers.runs import (
    TINY,
    assert_matches_single,
    final_params,
    losses,
    max_rel_diff,
    rel,
    runnable,
    skip_unless_runnable,
    summary,
    torchrun,
    train_single,
)

STEPS = 3
MOE = ["model.arch=llama", "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.d_ff=24",
       "model.moe.experts=4", "model.moe.top_k=2", "model.moe.z_loss_coef=0.001", "model.moe.shared_experts=1",
       f"steps={STEPS}", "global_batch=8", "micro_batch=2", "progress=false", "checkpoint.every=0", "checkpoint.keep=3",
       "checkpoint.save_final=true", "optim.warmup_steps=1", "eval.every=3", "eval.batches=1"]
CAPACITY = "model.moe.capacity_factor=0.75"   # slots dropped, each rank its own micro-batches' (as single)
SAVE = "checkpoint.every=1"   # the runs whose step-1 checkpoint another starts from
TWO = {"ddp-ep2": ["recipe=ddp", "ep.degree=2", SAVE], "fsdp-ep2": ["recipe=fsdp", "ep.degree=2"],
       "zero2": ["recipe=zero2"]}   # experts without ep: DeepSpeed's engine takes the MoE model as any other
FOUR = {"fsdp4-ep2": ["recipe=fsdp", "ep.degree=2"], "ddp-tp2-ep2": ["recipe=ddp", "tp.degree=2", "ep.degree=2"],
        "fsdp-tp2-ep2": ["recipe=fsdp", "tp.degree=2", "ep.degree=2"]}


EP = [name for name in {**TWO, **FOUR} if name != "zero2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep")
    train_single(root / "single", [*MOE, SAVE])
    resumed = {"ddp-ep2-capacity": ["recipe=ddp", "ep.degree=2", CAPACITY],
               "fsdp-ep2-from-single": ["recipe=fsdp", "ep.degree=2", f"checkpoint.load_from={step1(root / 'single')}"]}
    for nproc, layouts in ((2, TWO | resumed), (4, FOUR)):
        torchrun(nproc, [(TINY, [*MOE, *over, f"run_dir={root / name}"]) for name, over in layouts.items()
                         if runnable(over[0])])
    train_single(root / "single-from-ddp-ep2", [*MOE, f"checkpoint.load_from={step1(root / 'ddp-ep2')}"])
    train_single(root / "single-capacity", [*MOE, CAPACITY])
    return root


def step1(run: Path) -> str:
    return str(run / "checkpoints" / "step_000001")


@pytest.mark.parametrize("name", [*TWO, *FOUR])
def test_expert_parallel_matches_single(runs, name):
    skip_unless_runnable(name)
    assert_matches_single(runs / name, runs / "single", STEPS)


@pytest.mark.parametrize("name", ["fsdp-ep2-from-single", "single-from-ddp-ep2"])
def test_universal_checkpoint_reshards_experts(runs, name):
    """ep=1 -> ep=2 and ep=2 -> ep=1: the steps after the checkpoint equal the uninterrupted single run's."""
    got, ref = losses(runs / name), losses(runs / "single")
    assert len(got) == STEPS - 1 and max(rel(a, b) for a, b in zip(got, ref[1:], strict=True)) < 1e-5, (got, ref)
    assert max_rel_diff(final_params(runs / name), final_params(runs / "single")) < 1e-5


@pytest.mark.parametrize("name", EP)
def test_moe_summary_measured_beside_predicted(runs, name):
    """The summary's moe part: the same routing as single's (every rank's tokens once), the all-to-all bytes of
    one step (mean over ranks) equal to the dropless formula, each rank holding 1/ep of the expert bytes."""
    got, ref = summary(runs / name), summary(runs / "single")
    assert got["moe_tokens_per_expert"] == ref["moe_tokens_per_expert"]
    slots = STEPS * 8 * 32 * 2 + 8 * 32 * 2   # training steps and one evaluation of global_batch sequences
    assert [sum(layer) for layer in got["moe_tokens_per_expert"]] == [slots, slots] and got["moe_dropped"] == 0
    measured = got["ep_all_to_all_bytes_per_step_per_rank_measured"]
    assert measured == got["ep_all_to_all_bytes_per_step_per_rank_predicted"] > 0
    split = 4 if name == "fsdp4-ep2" else 2   # fsdp shards the experts over all its dp ranks (ep x the rest)
    assert got["moe_expert_param_bytes_per_rank_measured"] == got["moe_expert_param_bytes_per_rank_predicted"] == \
        ref["moe_expert_param_bytes_per_rank_measured"] // split
    assert ref["ep_all_to_all_bytes_per_step_per_rank_measured"] is None


def test_zero_routes_as_single_and_holds_every_expert(runs):
    """ZeRO-2 without ep: the summary's moe part from DeepSpeed's engine too (the routing summed over its ranks)."""
    skip_unless_runnable("zero2")
    got, ref = summary(runs / "zero2"), summary(runs / "single")
    assert got["moe_tokens_per_expert"] == ref["moe_tokens_per_expert"] and got["ep_degree"] == 1
    assert got["moe_expert_param_bytes_per_rank_measured"] == ref["moe_expert_param_bytes_per_rank_measured"] > 0


@pytest.mark.parametrize("name", EP)
def test_memory_model_counts_experts_per_rank(runs, name):
    """Parameters, gradients and Adam moments each rank holds, measured, equal the recipe's formula: the
    experts split over ep under ddp, over every dp rank under fsdp."""
    got = summary(runs / name)
    assert got["model_state_bytes_per_rank"] == got["predicted_model_state_bytes_per_rank"]


def test_report_draws_the_routing_and_the_all_to_all(runs, tmp_path):
    """`wb report`: a routing histogram per run and MoE layer, the all-to-all bytes measured beside predicted."""
    from gpu_workbench.cli.report import build_report

    text = build_report([runs / "ddp-ep2", runs / "single"], tmp_path).read_text()
    assert (tmp_path / "moe_routing.png").stat().st_size > 0 and "![moe_routing.png](moe_routing.png)" in text
    assert "EP all-to-all MiB/step/rank measured" in text and "ep.degree" not in text   # a layout, not a difference


def test_dropping_tokens_under_expert_parallelism_matches_single(runs):
    """capacity_factor < 1: each rank drops its micro-batch's over-capacity slots before the dispatch, as
    single drops them from the same micro-batches."""
    assert_matches_single(runs / "ddp-ep2-capacity", runs / "single-capacity", STEPS)
    got, ref = summary(runs / "ddp-ep2-capacity"), summary(runs / "single-capacity")
    assert got["moe_dropped"] == ref["moe_dropped"] > 0 and got["moe_tokens_per_expert"] == ref["moe_tokens_per_expert"]
