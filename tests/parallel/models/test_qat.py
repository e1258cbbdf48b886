"""Quantisation-aware training (quant.qat): the fake quantiser against kernels.quant, the straight-through
gradient, conversion to QuantLinear, ddp and fsdp against single per step, recovery of the PTQ gap, bad input.

Units run on fresh random weights of odd shapes. End to end: one 2-rank torchrun launch trains ddp (w4a16,
w8a8), fsdp (w4a16) and ddp x cp 2 (w4a16) with QAT; the single references run in this process. The
recovery check fine-tunes one small base run twice (with and without QAT) in this process.
"""

from __future__ import annotations

import random

import pytest
import torch

from gpu_workbench.kernels import quant
from gpu_workbench.kernels.quant.format import int_weight, resolve_group_size, weight_grid
from gpu_workbench.kernels.quant.qat import QATLinear, fake_quantize_activations, fake_quantize_weight, prepare_qat
from gpu_workbench.parallel import RunConfig, train
from gpu_workbench.parallel.models import qat
from gpu_workbench.parallel.models.transformer import GPT
from gpu_workbench.parallel.tools.quant_eval import quantised_copy
from tests.helpers.runs import TINY, final_params, losses, max_rel_diff, rel, summary, torchrun
from tests.workbench.test_user_errors import main_error

# every mode at every group size it takes (the 8-bit modes ignore it: per output channel)
GRIDS = [("w4a16", g) for g in (32, 64, 128, None)] + [(m, g) for m in ("w8a16", "w8a8") for g in (128, None)]
GRID_IDS = [f"{m}-g{g}" for m, g in GRIDS]


def _gen():
    return torch.Generator().manual_seed(random.randrange(2**31))


def _weight(n: int, k: int, gen) -> torch.Tensor:
    """Trained-looking weights, plus rows of one sign: their w4a16 groups clip (the zero point saturates)."""
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0] = w[0].abs() + 0.01
    w[1] = -w[1].abs() - 0.01
    return w


# ---- the fake quantiser is kernels.quant.quantize, bit for bit ---------------------------------------
@pytest.mark.parametrize("mode,group", GRIDS, ids=GRID_IDS)
def test_fake_quantiser_codes_equal_the_kernels(mode, group):
    gen = _gen()
    w = _weight(37, 256, gen)
    qw = quant.quantize(w, mode, group)
    grid = weight_grid(w, mode, resolve_group_size(mode, group, 256))
    assert torch.equal(grid.integers().to(torch.int32), int_weight(qw))   # the integers the kernel multiplies
    assert torch.equal(grid.scales.T.contiguous(), qw.scales)
    if mode == "w4a16":
        assert torch.equal(grid.zeros.to(torch.uint8).T.contiguous(), qw.zeros)
    lin = QATLinear.from_linear(_linear(w), mode, group)
    assert torch.equal(fake_quantize_weight(lin.weight, mode, group), quant.dequantize(qw))
    x = torch.randn(5, 256, generator=gen)
    x_used = fake_quantize_activations(x) if mode == "w8a8" else x
    assert torch.equal(lin(x), torch.nn.functional.linear(x_used, quant.dequantize(qw), lin.bias))


def _linear(w: torch.Tensor, bias: bool = True) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_straight_through_gradient_passes_where_unclipped():
    gen = _gen()
    w = _weight(9, 64, gen).requires_grad_()
    upstream = torch.randn(9, 64, generator=gen)
    (fake_quantize_weight(w, "w4a16", 32) * upstream).sum().backward()
    grid = weight_grid(w.detach(), "w4a16", 32)
    assert 0 < grid.clipped.sum() < grid.clipped.numel() // 4   # the one-sign rows clip, the others do not
    assert torch.equal(w.grad, torch.where(grid.clipped, 0.0, upstream))
    # where it clipped, the weight really is off the grid by more than half a step
    step = grid.scales.float().repeat_interleave(32, 1)
    assert ((w.detach() - grid.dequantized()).abs()[grid.clipped] > step[grid.clipped] / 2).all()
    for mode in ("w8a16", "w8a8"):   # symmetric max-scaled: nothing clips, the gradient is the identity
        w.grad = None
        (fake_quantize_weight(w, mode, None) * upstream).sum().backward()
        assert torch.equal(w.grad, upstream)
    x = torch.randn(3, 5, 64, generator=gen, requires_grad=True)
    (fake_quantize_activations(x) * 2.5).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.5))


@pytest.mark.parametrize("mode", quant.MODES)
def test_converted_layer_and_model_equal_the_fake_quantised_forward(mode):
    gen = _gen()
    lin = QATLinear.from_linear(_linear(_weight(33, 96, gen)), mode, 32)
    x = torch.randn(2, 7, 96, generator=gen)
    want = lin(x).detach().double()
    backends = ["torch", "interpret"] if mode == "w4a16" else ["torch"]   # the Triton kernel itself, once
    for backend in backends:
        got = quant.QuantLinear.from_linear(lin, mode, 32, backend=backend)(x).detach().double()
        assert float((got - want).norm() / want.norm()) < 1e-5, (mode, backend)
    # a whole QAT model, converted the way `wb quant eval` converts it
    cfg = RunConfig.from_toml(TINY, [f"quant.qat={mode}", "quant.group_size=32", "model.n_layers=1"])
    torch.manual_seed(random.randrange(2**31))
    model = GPT(cfg.model)
    record = qat.apply(model, cfg)
    assert record["layers"] == 6 and not isinstance(model.head, QATLinear)
    idx = torch.randint(0, 64, (3, 32), generator=gen)
    with torch.no_grad():
        want, got = model(idx).double(), quantised_copy(model, mode, 32)(idx).double()
    # w8a8 rounds every activation: where the two paths' fp32 sums differ by an ulp at a .5 boundary, one int8
    # code flips by one step (~1% of that token's max) and the next layers carry it; measured up to 8e-5
    tol = 1e-3 if mode == "w8a8" else 1e-5
    assert float((got - want).norm() / want.norm()) < tol


# ---- ddp and fsdp against single, per step ---------------------------------------------------------
QAT = ["steps=4", "progress=false", "checkpoint.every=0", "checkpoint.save_final=true", "optim.warmup_steps=1",
       "quant.group_size=32"]
DISTRIBUTED = {"ddp-w4a16": ["recipe=ddp", "quant.qat=w4a16"], "fsdp-w4a16": ["recipe=fsdp", "quant.qat=w4a16"],
               "ddp-w8a8": ["recipe=ddp", "quant.qat=w8a8"],
               "ddpcp-w4a16": ["recipe=ddp", "cp.degree=2", "quant.qat=w4a16"]}   # ring attention, whole tokens


@pytest.fixture(scope="module")
def qat_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    dirs = {name: root / name for name in [*DISTRIBUTED, "single-w4a16", "single-w8a8", "single-none"]}
    for mode in ("w4a16", "w8a8", "none"):
        train(RunConfig.from_toml(TINY, [*QAT, f"quant.qat={mode}", f"run_dir={dirs[f'single-{mode}']}"]))
    torchrun(2, [(TINY, [*QAT, *o, f"run_dir={dirs[n]}"]) for n, o in DISTRIBUTED.items()])
    return dirs


@pytest.mark.parametrize("name", list(DISTRIBUTED))
def test_qat_under_ddp_and_fsdp_matches_single(name, qat_runs):
    mode = name.split("-")[1]
    ref, got = losses(qat_runs[f"single-{mode}"]), losses(qat_runs[name])
    assert len(got) == len(ref) == 4 and ref[-1] < ref[0]
    assert max(rel(a, b) for a, b in zip(got, ref, strict=True)) < 1e-5, (got, ref)
    got_params, ref_params = final_params(qat_runs[name]), final_params(qat_runs[f"single-{mode}"])
    if mode == "w8a8":
        # Rounding is discontinuous: the all-reduce's summation order moves a weight by an ulp, and the next
        # step's per-token activation rounding flips for the odd token sitting on a .5 boundary (thousands of
        # roundings per layer); Adam turns the small gradient change into lr-sized steps where gradients are
        # tiny. Measured: losses 7e-6 apart, parameters 6e-5 (as one vector). w4a16 rounds only weights.
        flat = [torch.cat([p[k].double().flatten() for k in ref_params]) for p in (got_params, ref_params)]
        assert float((flat[0] - flat[1]).norm() / flat[1].norm()) < 2e-4
    else:
        assert max_rel_diff(got_params, ref_params) < 1e-5
    assert summary(qat_runs[name])["qat"] == {"mode": mode, "group_size": 32 if mode == "w4a16" else None,
                                              "layers": 12, "head_quantised": False}


def test_qat_changes_the_trajectory(qat_runs):
    """The fake quantiser is really in the forward: QAT's losses differ from the float run's."""
    assert summary(qat_runs["single-none"])["qat"] is None
    assert losses(qat_runs["single-w4a16"])[1:] != losses(qat_runs["single-none"])[1:]


# ---- QAT recovers the PTQ gap ----------------------------------------------------------------------
# A base run, then the same fine-tune with and without QAT w4a16 g32. The model is narrow (d_model 32) so
# that 4-bit rounding costs held-out loss (measured: ~1.4e-3 nats, ~10x the difference QAT makes to the
# fp loss); the fine-tune is gentle (lr 3e-4, constant), so both fine-tunes stay on one trajectory and
# the difference in PTQ loss is QAT's doing. Measured share recovered: 0.49 (README.md, QAT experiment).
SMALL = ["model.d_model=32", "model.n_heads=2", "progress=false", "eval.batches=4", "log_every=1000"]
FINE_TUNE = ["steps=80", "eval.every=80", "optim.lr=3e-4", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
             "checkpoint.every=0", "checkpoint.save_final=true", "checkpoint.load_model_only=true",
             "quant.group_size=32"]


def test_qat_recovers_part_of_the_ptq_gap(tmp_path):
    from gpu_workbench.parallel.tools.quant_eval import evaluate

    base = tmp_path / "base"
    train(RunConfig.from_toml(TINY, [*SMALL, "steps=150", "checkpoint.every=150", f"run_dir={base}"]))
    result = {}
    for mode in ("none", "w4a16"):
        run = tmp_path / f"fine-tune-{mode}"
        train(RunConfig.from_toml(TINY, [*SMALL, *FINE_TUNE, f"checkpoint.load_from={base}", f"quant.qat={mode}",
                                         f"run_dir={run}"]))
        report, _ = evaluate(run, ["w4a16"], 32, 4)
        result[mode] = report["fp"]["loss"], report["modes"]["w4a16"]["loss"]
    (fp, ptq), (fp_qat, ptq_qat) = result["none"], result["w4a16"]
    # the QAT run's own held-out loss (fake-quantised forward) is that of the converted model: the same integers
    assert rel(summary(tmp_path / "fine-tune-w4a16")["final_val_loss"], ptq_qat) < 1e-5
    gap = ptq - fp
    assert gap > 5 * abs(fp_qat - fp), result   # a real gap: well above what QAT does to the fp loss
    share = (ptq - ptq_qat) / gap
    assert share > 0.1, f"share of the PTQ gap recovered {share:.2f}: {result}"


# ---- bad input: one line, exit 2 -------------------------------------------------------------------
@pytest.mark.parametrize("overrides,needles", [
    (["quant.qat=w3a16"], ["quant.qat must be one of", "'w4a16'"]),
    (["quant.qat=w4a16", "quant.group_size=48"], ["quant.group_size must be 32, 64 or 128"]),
    (["quant.qat=w4a16", "quant.group_size=128"], ["quant.group_size=128 does not divide model.d_model (64)"]),
    (["quant.qat=w4a16", "model.d_ff=160", "quant.group_size=64"], ["does not divide model.d_ff (160)"]),
    (["quant.qat=w8a8", "recipe=zero2"], ["quant.qat=w8a8 does not work with recipe=zero2"]),
    (["quant.qat=w8a16", "recipe=ddp", "tp.degree=2"], ["tp.degree=2", "per-output-channel scale"]),
])
def test_bad_qat_settings_are_one_line(overrides, needles, capsys, tmp_path):
    err = main_error(capsys, "train", "--config", TINY, "--run-dir", str(tmp_path / "run"), "steps=1",
                     "progress=false", *overrides)
    assert all(n in err for n in needles), err
    assert not (tmp_path / "run").exists()


def test_fake_quantiser_bad_input_names_the_argument():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="mode='w3a16' is not a quantisation mode"):
        fake_quantize_weight(w, "w3a16", 32)
    with pytest.raises(ValueError, match="group_size=128 does not divide K=64"):
        fake_quantize_weight(w, "w4a16", 128)
    with pytest.raises(TypeError, match="w must be a 2-D floating-point"):
        fake_quantize_weight(w.long(), "w4a16", 32)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 8))
    with pytest.raises(ValueError, match="cannot fake-quantise layer '1'"):
        prepare_qat(model, "w4a16", 64, ["0", "1"])
    assert not any(isinstance(m, QATLinear) for m in model)   # checked before anything changed
