"""`wb quant eval` (parallel/tools/quant_eval.py): per-layer output SQNR on held-out activations of a trained run,
model bytes, held-out loss per mode; the JSON it writes; bad input as one line.

One trained run (a tiny gpt2 at d_model 128, so that groups of 32, 64 and 128 all divide every layer) serves
every check; SQNR is checked against an independent float64 computation for one layer.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from gpu_workbench.cli.app import main
from gpu_workbench.kernels import quant
from gpu_workbench.parallel import RunConfig, train
from gpu_workbench.parallel.models.qat import quantised_layers
from gpu_workbench.parallel.tools import sampling
from gpu_workbench.parallel.tools.quant_eval import evaluate, held_out_batches
from tests.helpers.runs import TINY, rel, summary, wb
from tests.workbench.test_user_errors import main_error, one_line

RUN = ["model.d_model=128", "steps=30", "progress=false", "checkpoint.every=30", "eval.every=30", "eval.batches=2",
       "optim.warmup_steps=3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("quant-eval") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(RunConfig.from_toml(TINY, [*RUN, f"run_dir={run}"]))
    finally:
        torch.set_num_threads(before)
    return run


@pytest.fixture(scope="module")
def reports(run_dir):
    """group size -> report for w8a16, w4a16 and w8a8 (-1: w4a16 per output channel)."""
    return {g: evaluate(run_dir, ["w8a16", "w4a16", "w8a8"], g, 2)[0] for g in (32, 64, 128, -1)}


def _sqnr(report: dict, mode: str) -> dict[str, float]:
    return {layer["name"]: layer["sqnr_db"] for layer in report["modes"][mode]["layers"]}


def test_sqnr_orders_the_modes_and_group_sizes(reports):
    w8, w4 = _sqnr(reports[32], "w8a16"), {g: _sqnr(reports[g], "w4a16") for g in reports}
    assert len(w8) == 12
    assert all(w8[n] > w4[32][n] + 12 for n in w8), (w8, w4[32])   # 4 more bits: ~24 dB, at least 12
    medians = [reports[g]["modes"]["w4a16"]["sqnr_db_median"] for g in (32, 64, 128, -1)]
    assert medians == sorted(medians, reverse=True) and medians[0] > medians[-1] + 1, medians
    assert all(w4[32][n] >= w4[128][n] for n in w8), (w4[32], w4[128])
    # w8a8 adds the activations' rounding to w8a16's weights: never better
    assert all(_sqnr(reports[32], "w8a8")[n] <= w8[n] + 1e-9 for n in w8)
    for g, report in reports.items():
        for mode, r in report["modes"].items():
            values = [layer["sqnr_db"] for layer in r["layers"]]
            assert r["sqnr_db_min"] == min(values) and min(values) <= r["sqnr_db_median"] <= max(values), (g, mode)


def test_sqnr_equals_an_independent_float64_measurement(run_dir, reports):
    """blocks.1.mlp.down: its input on the held-out micro-batches, y and y_q recomputed in float64."""
    model, cfg, _ = sampling.load_model(run_dir)
    layer = model.get_submodule("blocks.1.mlp.down")
    inputs = []
    handle = layer.register_forward_hook(lambda m, args, y: inputs.append(args[0].detach().double()))
    with torch.no_grad():
        for x, y in held_out_batches(cfg, 2):
            model(x, y)
    handle.remove()
    x = torch.cat([t.flatten(0, 1) for t in inputs])
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    y = x @ w.T + b
    y_q = x @ quant.dequantize(quant.quantize(layer.weight, "w4a16", 64)).double().T + b
    want = 10 * math.log10(float(y.pow(2).sum() / (y - y_q).pow(2).sum()))
    assert abs(_sqnr(reports[64], "w4a16")["blocks.1.mlp.down"] - want) < 1e-3


def test_losses_and_bytes(run_dir, reports):
    report = reports[32]
    fp = report["fp"]
    assert rel(fp["loss"], summary(run_dir)["final_val_loss"]) < 1e-6   # the run's own held-out loss
    assert math.isclose(fp["perplexity"], math.exp(fp["loss"]))
    model, _, _ = sampling.load_model(run_dir)
    n_params = sum(p.numel() for p in model.parameters())   # the tied head once
    assert fp["bytes"] == 4 * n_params
    shapes = [model.get_submodule(n).weight.shape for n in quantised_layers(model)]
    float_bytes = sum(4 * n * k for n, k in shapes)
    assert report["modes"]["w8a16"]["bytes"] == fp["bytes"] - float_bytes + sum(n * k + 4 * n for n, k in shapes)
    w4 = sum(n * k // 2 + (k // 32) * n * 3 for n, k in shapes)   # 4-bit codes, fp16 scale + uint8 zero per group
    assert report["modes"]["w4a16"]["bytes"] == fp["bytes"] - float_bytes + w4
    for mode, r in report["modes"].items():
        assert r["loss"] > fp["loss"] - 0.01 and math.isclose(r["perplexity"], math.exp(r["loss"])), mode
    assert report["modes"]["w4a16"]["loss"] - fp["loss"] > report["modes"]["w8a16"]["loss"] - fp["loss"]


def test_cli_table_and_json(run_dir, reports, tmp_path, capsys):
    out = tmp_path / "sub" / "quant_eval.json"
    with pytest.raises(SystemExit) as done:   # typer's standalone mode exits, 0 on success
        main(["quant", "eval", str(run_dir), "--modes", "w8a16,w4a16", "--group-size", "64", "--batches", "2",
              "--json", str(out)])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "w4a16" in printed and "SQNR median dB" in printed and "step_000030" in printed
    got = json.loads(out.read_text())
    assert set(got) == {"fp", "modes"} and set(got["fp"]) == {"loss", "perplexity", "bytes"}
    assert list(got["modes"]) == ["w8a16", "w4a16"]
    names = quantised_layers(sampling.load_model(run_dir)[0])
    for r in got["modes"].values():
        assert set(r) == {"loss", "perplexity", "bytes", "sqnr_db_min", "sqnr_db_median", "layers"}
        assert [layer["name"] for layer in r["layers"]] == names
        assert all(set(layer) == {"name", "sqnr_db"} for layer in r["layers"])
    assert got["modes"]["w4a16"] == reports[64]["modes"]["w4a16"]   # deterministic; JSON keeps every float


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    err = main_error(capsys, "quant", "eval", str(run_dir), "--modes", "w8a16,w3a16")
    assert "--modes" in err and "'w3a16'" in err and "w8a16, w4a16, w8a8" in err, err
    odd = tmp_path / "odd"   # d_model 96: groups of 64 do not divide it
    train(RunConfig.from_toml(TINY, ["model.d_model=96", "steps=1", "progress=false", "checkpoint.every=1",
                                     f"run_dir={odd}"]))
    err = main_error(capsys, "quant", "eval", str(odd), "--group-size", "64")
    assert "--group-size 64 does not divide layer blocks.0.attn.q's in_features (96)" in err, err
    bare = tmp_path / "bare"   # a run directory without any checkpoint: the real CLI, in a subprocess
    bare.mkdir()
    shutil.copy(run_dir / "config.json", bare / "config.json")
    one_line(wb("quant", "eval", str(bare)), f"RUN_DIR {bare} has no complete checkpoint", "to evaluate")


def test_report_draws_the_quant_figure(run_dir, reports, tmp_path):
    from gpu_workbench.cli.report import build_report

    plain = build_report([run_dir], tmp_path / "plain")
    assert "quant_eval.png" not in plain.read_text()   # no quant_eval.json yet: no figure
    (run_dir / "quant_eval.json").write_text(json.dumps(reports[32]))
    try:
        text = build_report([run_dir], tmp_path / "with").read_text()
    finally:
        (run_dir / "quant_eval.json").unlink()
    assert "![quant_eval.png](quant_eval.png)" in text
    assert (tmp_path / "with" / "quant_eval.png").stat().st_size > 10_000
