"""Quantised matmul: formats, kernels (interpreter + torch + GPU), QuantLinear, quantize_model, AOT compile.

The kernel check is against a float64 reference of x @ dequantize(qw).T (for w8a8, of the per-token
quantised x): that is float rounding level. Quantisation error against the float weight is checked
separately, against the bound of the bit width.
"""

from __future__ import annotations

import io
import random
import types

import pytest
import torch
from torch import nn

from gpu_workbench import kernels
from gpu_workbench.kernels import jit_loader, quant
from gpu_workbench.kernels.autotune import Config
from gpu_workbench.kernels.quant.format import int_weight
from gpu_workbench.kernels.quant_matmul import SMALL_M_TUNER, act_quant, compile_specs, config_archs, launch, tuner_for
from gpu_workbench.kernels.suite.common import TOLERANCE, rel_err

# (mode, group_size, K): per-group w4a16 at every supported group, per channel with K not a multiple of 8.
VARIANTS = [("w8a16", None, 136), ("w4a16", 32, 96), ("w4a16", 64, 192), ("w4a16", 128, 256),
            ("w4a16", None, 100), ("w8a8", None, 136)]
VARIANT_IDS = [f"{m}-g{g}" for m, g, _ in VARIANTS]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gen(seed=None):
    """Fresh random inputs every run (a fixed seed only where a test needs two equal models)."""
    return torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**31))


def _weight(n, k, gen, dtype=torch.float32):
    return (torch.randn(n, k, generator=gen) * 0.05).to(dtype)


def _reference(x: torch.Tensor, qw) -> torch.Tensor:
    """float64 x @ dequantize(qw).T, with x quantised per token first for w8a8."""
    x = x.cpu()
    if qw.mode == "w8a8":
        x = quant.dequantize_activations(*quant.quantize_activations(x))
    return x.double() @ quant.dequantize(qw.to("cpu")).double().T


# ----------------------------------------------------------------------------------------------
# Kernels against float64, interpreter and torch backends
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,group,k", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("n", [17, 96])
@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_matches_float64(backend, n, m, mode, group, k):
    gen = _gen()
    qw = quant.quantize(_weight(n, k, gen), mode, group)
    x = torch.randn(m, k, generator=gen)
    y = kernels.quant_matmul(x, qw, backend=backend)
    assert y.shape == (m, n) and y.dtype == x.dtype
    assert rel_err(y, _reference(x, qw)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("mode,group,k", [VARIANTS[0], VARIANTS[1], VARIANTS[5]], ids=["w8a16", "w4a16-g32", "w8a8"])
@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_fp16_and_leading_dims(backend, mode, group, k):
    gen = _gen()
    qw = quant.quantize(_weight(40, k, gen), mode, group)
    x = torch.randn(2, 9, k + 8, generator=gen).half()[..., :k]  # rows strided by k + 8
    y = kernels.quant_matmul(x, qw, backend=backend)
    assert y.shape == (2, 9, 40) and y.dtype == torch.float16
    assert rel_err(y, _reference(x.reshape(-1, k), qw).reshape(2, 9, 40)) < TOLERANCE[torch.float16]
    assert kernels.quant_matmul(x[:, :0], qw, backend=backend).shape == (2, 0, 40)  # no rows


@pytest.mark.parametrize("mode,group", [("w8a16", None), ("w4a16", 32), ("w4a16", None), ("w8a8", None)])
def test_every_config_interpreted(mode, group):
    """Each autotune config, split-K (atomic) or not, gives the right answer: the GPU may pick any."""
    gen = _gen()
    k = 256
    qw = quant.quantize(_weight(72, k, gen), mode, group)
    for m in (3, 20):
        x = torch.randn(m, k, generator=gen)
        ref = _reference(x, qw)
        for config in tuner_for(mode, m).candidates(lambda c: qw.per_channel or qw.group_size % c.meta["BLOCK_K"] == 0):
            assert rel_err(launch(x, qw, "interpret", config), ref) < 1e-5, config.label()


def test_skipped_output_cannot_pass(monkeypatch):
    """The interpreter launch pre-fills its output with NaN: a kernel that writes nothing fails the check."""
    gen = _gen()
    qw = quant.quantize(_weight(33, 64, gen), "w8a16")
    x = torch.randn(20, 64, generator=gen)

    class NoOpKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    fake = types.SimpleNamespace(quant_matmul_kernel=NoOpKernel())
    monkeypatch.setattr(jit_loader, "kernels_for", lambda name, backend: fake)
    for config in (tuner_for("w8a16", 20).configs[0], SMALL_M_TUNER.configs[0]):  # plain store, split-K atomic
        assert rel_err(launch(x, qw, "interpret", config), _reference(x, qw)) >= 1


def test_act_quant_kernel_is_bit_exact():
    gen = _gen()
    for dtype in (torch.float32, torch.float16):
        x = (torch.randn(9, 300, generator=gen) * torch.logspace(-3, 2, 9)[:, None]).to(dtype)
        x[4] = 0  # an all-zero token gets scale 1 and zeros, not NaN
        xq, sx = act_quant(x, "interpret")
        xq_ref, sx_ref = quant.quantize_activations(x)
        assert torch.equal(sx, sx_ref) and torch.equal(xq, xq_ref)
        assert xq.abs().max() == 127 and sx[4] == 1


# ----------------------------------------------------------------------------------------------
# Formats: packing, exact dequantisation, quantisation error
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [8, 37, 256])
def test_int4_pack_roundtrip(k):
    q = torch.randint(0, 16, (19, k), generator=_gen(), dtype=torch.uint8)
    q[0, :] = 15  # every nibble set, including the int32 sign bit
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (-(-k // 8), 19)
    assert torch.equal(quant.unpack_int4(packed, k), q)


@pytest.mark.parametrize("mode,group,k", VARIANTS, ids=VARIANT_IDS)
def test_quantisation_error_within_bound(mode, group, k):
    gen = _gen()
    w = _weight(64, k, gen)
    qw = quant.quantize(w, mode, group)
    deq = quant.dequantize(qw)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    # dequantize is integer weight x scale, one fp32 rounding (exact for w4a16's fp16 scales).
    scale = qw.scales.float().T.repeat_interleave(qw.group_size, 1)
    assert torch.equal(deq, int_weight(qw).float() * scale)
    # Round to nearest: each weight within half a step of its dequantised value.
    assert ((deq - w).abs() <= 0.5 * scale * (1 + 1e-3)).all()
    if mode == "w4a16":
        assert qw.qweight.dtype == torch.int32 and qw.zeros.dtype == torch.uint8 and qw.scales.dtype == torch.float16
        assert int(qw.zeros.max()) <= 15
    else:
        assert qw.qweight.dtype == torch.int8 and int(qw.qweight.abs().max()) == 127
    # Relative Frobenius error for Gaussian weights: 8-bit ~0.7%, 4-bit ~10% (step/sqrt(12) of the range).
    bound = 0.012 if qw.bits == 8 else 0.13
    assert rel_err(deq, w) < bound


def test_zero_weight_and_bad_inputs():
    w = torch.zeros(4, 64)
    for mode in quant.MODES:
        assert torch.equal(quant.dequantize(quant.quantize(w, mode, None)), w)
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize(torch.randn(4, 96), "w4a16", 64)
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize(torch.randn(4, 96), "w4a16", 48)
    with pytest.raises(ValueError, match="mode"):
        quant.quantize(torch.randn(4, 96), "w3a16")
    with pytest.raises(TypeError, match="w "):
        quant.quantize(torch.ones(4, 96, dtype=torch.int32), "w8a16")
    with pytest.raises(ValueError, match="NaN"):
        quant.quantize(torch.full((4, 32), float("nan")), "w8a16")


def test_quant_matmul_bad_inputs():
    qw = quant.quantize(torch.randn(8, 64), "w4a16", 32)
    with pytest.raises(ValueError, match="K=63"):
        kernels.quant_matmul(torch.randn(2, 63), qw, backend="interpret")
    with pytest.raises(TypeError, match="x has dtype int64"):
        kernels.quant_matmul(torch.ones(2, 64, dtype=torch.int64), qw)
    with pytest.raises(TypeError, match="x has dtype float64"):
        kernels.quant_matmul(torch.ones(2, 64, dtype=torch.float64), qw)
    with pytest.raises(TypeError, match="qw must be a QuantizedWeight"):
        kernels.quant_matmul(torch.randn(2, 64), torch.randn(8, 64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        kernels.quant_matmul([1.0] * 64, qw)
    with pytest.raises(ValueError, match="x on cpu, qw.qweight on meta"):
        kernels.quant_matmul(torch.randn(2, 64), qw.to("meta"), backend="torch")
    mixed = quant.QuantizedWeight(qw.mode, qw.shape, qw.group_size, qw.qweight, qw.scales.to("meta"), qw.zeros)
    with pytest.raises(ValueError, match="qw.scales on meta"):
        kernels.quant_matmul(torch.randn(2, 64), mixed)
    bad = quant.QuantizedWeight(qw.mode, qw.shape, qw.group_size, qw.qweight, qw.scales.float(), qw.zeros)
    with pytest.raises(ValueError, match="qw.scales should be"):
        kernels.quant_matmul(torch.randn(2, 64), bad)
    with pytest.raises(ValueError, match="backend"):
        kernels.quant_matmul(torch.randn(2, 64), qw, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        kernels.quant_matmul(torch.randn(2, 64), qw, backend="triton")


def test_custom_op_opcheck():
    """The Triton path is a torch.library op with a fake implementation, so torch.compile can trace it."""
    from gpu_workbench.kernels.quant_matmul import _quant_matmul_op

    qw = quant.quantize(torch.randn(24, 64), "w4a16", 32)
    x = torch.randn(5, 64)
    torch.library.opcheck(_quant_matmul_op, (x, qw.qweight, qw.scales, qw.zeros, "w4a16", 24, 64, 32, "interpret"),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda t: kernels.quant_matmul(t, qw, backend="interpret"), fullgraph=True,
                             backend="eager")
    assert rel_err(compiled(x), _reference(x, qw)) < 1e-5


# ----------------------------------------------------------------------------------------------
# QuantLinear and quantize_model
# ----------------------------------------------------------------------------------------------
def _mlp(gen, dims=(128, 256, 64), bias=True):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(dims[0], dims[1], bias=bias), nn.GELU(), nn.Linear(dims[1], dims[2], bias=bias))


# Output error of a 2-layer MLP with quantised weights vs the float MLP (relative Frobenius).
MLP_TOLERANCE = {("w8a16", None): 0.02, ("w8a8", None): 0.03, ("w4a16", 32): 0.15, ("w4a16", 128): 0.2,
                 ("w4a16", None): 0.25}


@pytest.mark.parametrize("mode,group", list(MLP_TOLERANCE), ids=[f"{m}-g{g}" for m, g in MLP_TOLERANCE])
def test_quant_linear_mlp_close_to_float(mode, group):
    gen = _gen()
    mlp = _mlp(gen)
    x = torch.randn(7, 128, generator=gen)
    with torch.no_grad():
        ref = mlp(x)
        qmlp = nn.Sequential(*(quant.QuantLinear.from_linear(m, mode, group) if isinstance(m, nn.Linear) else m
                               for m in mlp))
        out = qmlp(x)
        for layer in (0, 2):
            qmlp[layer].backend = "interpret"
        out_interpret = qmlp(x)
    assert rel_err(out, ref) < MLP_TOLERANCE[(mode, group)]
    assert rel_err(out_interpret, out) < 1e-5
    assert torch.equal(qmlp[0].bias, mlp[0].bias)


def test_quant_linear_state_dict_roundtrip_and_repr():
    gen = _gen()
    lin = nn.Linear(96, 40)
    q = quant.QuantLinear.from_linear(lin, "w4a16", 32)
    assert "mode=w4a16" in repr(q) and "bits=4" in repr(q) and "group_size=32" in repr(q)
    assert "bits=8" in repr(quant.QuantLinear.from_linear(lin, "w8a8"))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = quant.QuantLinear(96, 40, bias=True, mode="w4a16", group_size=32)
    fresh.load_state_dict(torch.load(buf))
    assert set(q.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    x = torch.randn(3, 96, generator=gen)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    for module, scale_dtype in ((q, torch.float16), (quant.QuantLinear.from_linear(lin, "w8a16"), torch.float32)):
        scales = module.scales.clone()
        module.to(torch.bfloat16)  # converts the bias; the scales keep their dtype and exact values
        assert module.scales.dtype == scale_dtype and torch.equal(module.scales, scales)
        assert module.bias.dtype == torch.bfloat16
    no_bias = quant.QuantLinear.from_linear(nn.Linear(96, 8, bias=False), "w8a16")
    assert set(no_bias.state_dict()) == {"qweight", "scales"}
    with pytest.raises(RuntimeError):  # a different mode's buffers do not load silently
        quant.QuantLinear(96, 40, mode="w8a16").load_state_dict(q.state_dict())


def test_quantize_model_shrinks_and_runs():
    gen = _gen()
    model = nn.Sequential(_mlp(gen, (256, 512, 256)), nn.Linear(256, 100))
    x = torch.randn(4, 256, generator=gen)
    with torch.no_grad():
        ref = model(x)
    for dtype, min_ratio in ((torch.bfloat16, 3.5), (torch.float32, 7.0)):
        m = quant.quantize_model(_mlp(_gen(0), (256, 512, 256)).to(dtype), "w4a16", group_size=128)
        assert m.quant_summary["ratio"] >= min_ratio, (dtype, m.quant_summary)
    out_model = quant.quantize_model(model, "w4a16", group_size=128, exclude=("1",))
    assert out_model is model
    assert isinstance(model[0][0], quant.QuantLinear) and isinstance(model[0][2], quant.QuantLinear)
    assert type(model[1]) is nn.Linear
    s = model.quant_summary
    assert s["quantized"] == ["0.0", "0.2"] and s["excluded"] == ["1"]
    assert s["linear_weight_bytes_after"] == quant.linear_weight_bytes(model) < s["linear_weight_bytes_before"]
    with torch.no_grad():
        assert rel_err(model(x), ref) < 0.2
    with pytest.raises(ValueError, match="'0'"):
        quant.quantize_model(nn.Sequential(nn.Linear(96, 8)), "w4a16", group_size=64)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile for Ampere and Hopper (the full set runs in `wb kernels compile quant_matmul`)
# ----------------------------------------------------------------------------------------------
def test_compile_specs_cover_every_config():
    specs = compile_specs()
    labels = [s.label for s in specs]
    assert len(labels) == len(set(labels))
    compiled = {(s.signature["y_ptr"], s.constexprs["MODE"], s.constexprs["GROUPED"], s.num_warps, s.num_stages,
                 s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_K"], s.constexprs["ATOMIC"])
                for s in specs if s.fn == "quant_matmul_kernel"}
    for dtype in ("*fp16", "*bf16"):
        for mode, mode_id, grouped in (("w8a16", 0, False), ("w4a16", 1, True), ("w4a16", 1, False),
                                       ("w8a8", 2, False)):
            for m in (1, 20):
                for c in tuner_for(mode, m).configs:
                    atomic = c.meta["SPLIT_K"] > 1
                    key = ("*fp32" if atomic else dtype, mode_id, grouped, c.num_warps, c.num_stages,
                           c.meta["BLOCK_M"], c.meta["BLOCK_N"], c.meta["BLOCK_K"], atomic)
                    # A config the launcher never picks for this layout is not compiled; every other is.
                    assert (key in compiled) == bool(config_archs(c, mode, grouped)), key
    assert all(s.expect_ptx == {90: ("wgmma",)} for s in specs if " gemm " in s.label)
    assert sum(s.fn == "act_quant_kernel" for s in specs) == 2
    for s in specs:  # each spec is compiled exactly for the archs the launcher may run it on
        if s.fn == "quant_matmul_kernel":
            mode = {0: "w8a16", 1: "w4a16", 2: "w8a8"}[s.constexprs["MODE"]]
            c = Config({k: s.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")} | {"SPLIT_K": 1})
            assert s.archs == config_archs(c, mode, s.constexprs["GROUPED"]), s.label


def test_launcher_never_picks_a_config_outside_the_sweep():
    """The GEMM fits-filter, for a Hopper and an Ampere GPU, admits only configs compiled for that arch."""
    from gpu_workbench.kernels.quant_matmul import _fits

    specs = compile_specs()
    for mode, group in (("w8a16", None), ("w4a16", 128), ("w4a16", None), ("w8a8", None)):
        qw = quant.quantize(torch.randn(64, 256), mode, group)
        for arch in (80, 90):
            for c in tuner_for(mode, 64).configs:
                swept = [s for s in specs if s.constexprs.get("MODE") == {"w8a16": 0, "w4a16": 1, "w8a8": 2}[mode]
                         and s.constexprs.get("GROUPED") == (not qw.per_channel) and arch in s.archs
                         and all(s.constexprs.get(k) == c.meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                         and s.num_warps == c.num_warps and s.num_stages == c.num_stages]
                if _fits(c, qw, arch):
                    assert swept, (mode, group, arch, c.label())
    grouped = quant.quantize(torch.randn(64, 256), "w4a16", 128)
    assert not any(_fits(c, grouped, 90) for c in tuner_for("w4a16", 64).configs
                   if c.meta["BLOCK_M"] * c.meta["BLOCK_N"] > 128 * 128)


def test_aot_compile_sm80_sm90():
    from gpu_workbench.kernels.aot import compile_all

    specs = compile_specs()
    # The first (default) GEMM config of each mode variant, bf16, on Hopper.
    gemm = list({(s.constexprs["MODE"], s.constexprs["GROUPED"]): s for s in reversed(specs)
                 if " gemm " in s.label and "bf16" in s.label}.values())
    small = [s for s in specs if "small-M" in s.label and s.constexprs["ATOMIC"] and "fp16" in s.label
             and s.constexprs["BLOCK_K"] == 128]
    act = [s for s in specs if "act_quant" in s.label][:1]
    assert len(gemm) == 4 and len(small) == 4, [s.label for s in gemm + small]
    results = compile_all(gemm, archs=(90,)) + compile_all(small + act, archs=(80,))
    failed = [(r.spec.label, r.arch, r.failure) for r in results if not r.passed]
    assert not failed


def test_gemm_pipelines_when_aligned():
    """With the 16-divisibility the JIT specialises on for model shapes (pointers, K, N, strides), which
    compile_specs() declares, the GEMM loads become multi-stage async copies feeding wgmma, and still
    fit Hopper's shared memory."""
    from gpu_workbench.kernels import triton_compat as tc
    from gpu_workbench.kernels.aot import SHARED_MEMORY_LIMIT

    specs = [s for s in compile_specs() if " gemm " in s.label and "bf16" in s.label
             and s.constexprs["BLOCK_N"] == 256 and s.constexprs["MODE"] in (1, 2) and not s.constexprs["GROUPED"]]
    assert len(specs) == 2, [s.label for s in specs]
    for spec in specs:
        assert {"N", "K", "stride_xm"} <= set(spec.aligned), spec.label
        fn = getattr(jit_loader.load("quant_matmul", interpret=False), spec.fn)
        aligned = [n for n, t in spec.signature.items() if t.startswith("*")] + list(spec.aligned)
        compiled = tc.compile_for(tc.ast_source(fn, spec.signature, spec.constexprs, aligned), 90,
                                  spec.num_warps, spec.num_stages)
        assert "async_copy_global_to_local" in tc.intermediate(compiled, "ttgir"), spec.label
        assert "wgmma" in tc.intermediate(compiled, "ptx"), spec.label
        assert tc.shared_bytes(compiled) <= SHARED_MEMORY_LIMIT[90], (spec.label, tc.shared_bytes(compiled))


# ----------------------------------------------------------------------------------------------
# Compiled path on a GPU: fp16 / bf16 activations
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,group", [("w8a16", None), ("w4a16", 128), ("w4a16", 32), ("w4a16", None),
                                        ("w8a8", None)])
def test_gpu_compiled(mode, group, dtype):
    gen = _gen()
    n, k = 1000, 1024
    qw = quant.quantize(_weight(n, k, gen), mode, group).to("cuda")
    for m in (1, 5, 16, 17, 300):
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = kernels.quant_matmul(x.cuda(), qw)  # auto -> triton on CUDA
        assert y.dtype == dtype and y.is_cuda
        assert rel_err(y, _reference(x, qw)) < TOLERANCE[dtype], m


@pytest.mark.gpu
@cuda
def test_gpu_act_quant_bit_exact_and_compile():
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16) * 3
    xq, sx = act_quant(x, "triton")
    xq_ref, sx_ref = quant.quantize_activations(x)
    assert torch.equal(sx, sx_ref) and torch.equal(xq, xq_ref)
    qw = quant.quantize(torch.randn(512, 4096), "w4a16", 128).to("cuda")
    f = torch.compile(lambda t: kernels.quant_matmul(t, qw), fullgraph=True)
    assert rel_err(f(x), _reference(x, qw)) < TOLERANCE[torch.bfloat16]


def test_interpreter_refuses_bfloat16_everywhere():
    """The interpreter computes bf16 wrongly and silently: every kernel refuses it there, naming the argument."""
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    qw = quant.quantize(torch.randn(32, 64), mode="w8a16", group_size=32)
    with pytest.raises(TypeError, match="x is bfloat16, which the Triton interpreter computes wrongly"):
        kernels.quant_matmul(x, qw, backend="interpret")
    with pytest.raises(TypeError, match="linear.weight is bfloat16"):
        quant.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16), mode="w8a16",
                             group_size=32, backend="interpret")
    with pytest.raises(TypeError, match="x is bfloat16"):
        kernels.softmax(x, backend="interpret")
    q = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="q is bfloat16"):
        kernels.attention(q, q, q, backend="interpret")
    assert kernels.quant_matmul(x, qw, backend="torch").dtype == torch.bfloat16   # the torch path takes it
