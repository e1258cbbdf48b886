"""`pipeline` on real torchrun processes: equal to `single` (loss per step, grad norm, final parameters)
for every schedule and for pp=2 x dp=2; resume from a checkpoint; the pp checks; `wb train`. The bubble
measured against the prediction, and micro-batches in flight: test_pipeline_bubble.py."""

from __future__ import annotations

import json

import pytest

from gpu_workbench.cli.app import main
from gpu_workbench.parallel.runtime.rundir import read_metrics
from gpu_workbench.parallel.runtime.summary import RunSummary
from tests.helpers.runs import TINY, assert_matches_single, final_params, losses, max_rel_diff, summary, wb
from tests.helpers.workers.pipeline_runs import PIPE, torchrun

PP2 = {   # name -> overrides of the 2-process runs (each 10 fp32 steps of the equivalence config)
    "gpipe": ["pp.schedule=gpipe", "pp.layers_per_stage=[1, 4]"],   # an explicit split
    "1f1b": ["pp.schedule=1f1b", "checkpoint.every=5", "checkpoint.keep=2"],
    "interleaved-1f1b": ["pp.schedule=interleaved-1f1b", "pp.virtual_stages=2"],
    "zero-bubble": ["pp.schedule=zero-bubble", "pp.virtual_stages=2"],
}


@pytest.fixture(scope="module")
def pp_runs(tmp_path_factory):
    """One 2-process launch: the schedules and a resume from the 1f1b run's step-5 checkpoint; then one
    4-process launch for pp=2 x dp=2. (The bubble runs, which time themselves: test_pipeline_bubble.py.)"""
    root = tmp_path_factory.mktemp("pp")
    dirs = {name: root / name for name in [*PP2, "resumed", "pp2xdp2"]}
    items: list = [[TINY, [*PIPE, *over, f"run_dir={dirs[name]}"]] for name, over in PP2.items()]
    items.append(["copy", str(dirs["1f1b"]), str(dirs["resumed"]), 5])
    items.append([TINY, [*PIPE, *PP2["1f1b"], f"run_dir={dirs['resumed']}"]])
    torchrun(2, items)
    torchrun(4, [[TINY, [*PIPE, "pp.schedule=1f1b", "pp.degree=2", f"run_dir={dirs['pp2xdp2']}"]]])
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("name", [*PP2, "pp2xdp2"])
def test_pipeline_matches_single(name, pp_runs, reference):
    # clipping saw the same global norm over all stages (the tied embedding counted once)
    assert_matches_single(pp_runs[name], reference, steps=10)
    ref = losses(reference)
    assert ref[-1] < ref[0]
    assert max(m["grad_norm"] for m in read_metrics(pp_runs[name])) > 1.0   # grad_clip = 1.0 was active
    s = summary(pp_runs[name])
    assert s["recipe"] == "pipeline" and s["pp"] == 2 and s["dp"] == (2 if name == "pp2xdp2" else 1)
    m = 2 if name == "pp2xdp2" else 4   # global 16 = micro 4 x m x dp
    assert s["pp_microbatches"] == s["accum_steps"] == m


@pytest.mark.slow
def test_split_and_stage_memory(pp_runs):
    assert summary(pp_runs["1f1b"])["pp_layers_per_stage"] == [2, 3]     # balanced by parameters (5 blocks)
    assert summary(pp_runs["gpipe"])["pp_layers_per_stage"] == [1, 4]
    assert summary(pp_runs["interleaved-1f1b"])["pp_layers_per_stage"] == [1, 1, 2, 1]
    s = summary(pp_runs["1f1b"])
    assert s["model_state_bytes_per_rank"] == s["predicted_model_state_bytes_per_rank"]   # 16 bytes x stage params
    assert s["model_state_bytes_per_rank"] < 0.75 * 16 * s["n_params"]


@pytest.mark.slow
def test_resume_from_checkpoint(pp_runs):
    """Resumed after 5 steps from the universal checkpoint (each stage-rank its own tensors, in one DCP
    folder): the same steps 5..9 and end state."""
    clean, resumed = pp_runs["1f1b"], pp_runs["resumed"]
    assert summary(resumed)["resumed_from_step"] == 5
    assert sorted(p.name for p in (clean / "checkpoints" / "step_000005").iterdir()) == [
        "dcp", "meta.json", "trainer_rank0.pt", "trainer_rank1.pt"]
    assert losses(resumed) == pytest.approx(losses(clean)[5:], rel=1e-6)
    assert max_rel_diff(final_params(resumed), final_params(clean)) < 1e-6


PP_ERRORS = [
    (["--nproc", "3", "pp.degree=2"], "pp.degree 2 does not divide world size (--nproc) 3"),
    (["--nproc", "2", "pp.microbatches=1", "global_batch=4"], "pp.microbatches (1) must be >= pp.degree (2)"),
    (["--nproc", "2", "micro_batch=16"], "pp.microbatches (1) must be >= pp.degree (2)"),
    (["--nproc", "4", "model.n_layers=2", "pp.schedule=interleaved-1f1b", "pp.virtual_stages=2"],
     "model.n_layers (2) must be >= pp.degree x pp.virtual_stages (8)"),
    (["--nproc", "2", "pp.layers_per_stage=[1, 1, 0]"], "pp.layers_per_stage [1, 1, 0] must be >= 1 each"),
    (["--nproc", "2", "pp.layers_per_stage=[2]"], "pp.layers_per_stage has 1 entries, need pp.degree x"),
    (["--nproc", "2", "pp.layers_per_stage=3"], "pp.layers_per_stage must be a list of ints (e.g. [2, 3]), got 3"),
    (["--nproc", "2", "pp.virtual_stages=2"], "pp.virtual_stages must be 1 for pp.schedule=1f1b"),
    (["--nproc", "2", "pp.schedule=interleaved-1f1b"], "pp.virtual_stages must be >= 2 for pp.schedule=interleaved"),
    (["--nproc", "2", "model.n_layers=4", "pp.schedule=zero-bubble", "pp.microbatches=3", "global_batch=12"],
     "pp.microbatches (3) must be a multiple of pp.degree (2) for pp.schedule=zero-bubble"),
    (["--nproc", "2", "pp.microbatches=3"], "global_batch (16) must be divisible by pp.microbatches (3) x"),
    (["--nproc", "2", "pp.schedule=2f2b"], "pp.schedule must be one of 'gpipe' | '1f1b'"),
]


@pytest.mark.parametrize(("args", "message"), PP_ERRORS, ids=[" ".join(a) for a, _ in PP_ERRORS])
def test_pp_config_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", TINY, "--recipe", "pipeline", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wb: error: ") and message in err, err


@pytest.mark.slow
def test_wb_train_pipeline_writes_bubble_and_gantt(tmp_path):
    run_dir = tmp_path / "run"
    done = wb("train", "--recipe", "pipeline", "--nproc", "2", "pp.schedule=1f1b", "pp.microbatches=8", "--config",
              TINY, "--run-dir", str(run_dir), "steps=6", "progress=false", "--timeline")
    assert done.returncode == 0, done.stderr[-4000:]
    s = RunSummary.load(run_dir / "summary.json").flat()
    assert 0.0 < s["bubble_fraction_measured"] < 1.0 and s["bubble_fraction_predicted"] == pytest.approx(1 / 9,
                                                                                                         abs=0.1)
    assert s["micro_batch"] == 2 and s["pp_microbatches"] == 8 and s["final_loss"] < read_metrics(run_dir)[0]["loss"]
    png = (run_dir / "gantt.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    timeline = json.loads((run_dir / "pipeline.json").read_text())
    assert sorted(timeline["measured"]) == ["0", "1"] and len(timeline["predicted"]["0"]) == 16   # 8 F + 8 B
    trace = json.loads((run_dir / "trace.json").read_text())["traceEvents"]
    spans = {(e["pid"], e["name"], e["args"].get("stage")) for e in trace if e["ph"] == "X"}
    assert {(0, "fwd", 0), (0, "bwd", 0), (1, "fwd", 1), (1, "bwd", 1), (0, "recv", -1), (1, "optimizer", None)} \
        <= spans, sorted(spans)
