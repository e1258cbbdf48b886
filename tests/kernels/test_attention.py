"""Attention: the real Triton kernels (interpreter) and the torch path vs float64, gradients,
determinism, errors, autograd/compile integration, ahead-of-time compile, and GPU checks."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn

from gpu_workbench import kernels
from gpu_workbench.kernels.suite.attention import errors, make_inputs, reference
from gpu_workbench.kernels.suite.common import TOLERANCE, rel_err

# the launcher module (gpu_workbench.kernels.attention as an attribute is the function of that name)
fa = importlib.import_module("gpu_workbench.kernels.attention")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Fresh outputs start as NaN: an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(fa, "POISON_OUTPUTS", True)


# (B, Hq, Hkv, N, M, D, causal, transposed)
CASES = [
    (1, 1, 1, 1, 1, 16, False, False),  # N = M = 1
    (1, 2, 2, 1, 33, 16, True, False),  # one query, causal: sees every key
    (1, 2, 1, 1, 17, 64, False, False),  # one query, MQA
    (2, 3, 3, 17, 17, 32, True, False),  # N = 17, lower triangle
    (1, 2, 2, 17, 17, 64, False, False),
    (1, 4, 1, 100, 37, 40, True, False),  # N > M causal: 63 rows see no key; MQA; D = 40
    (1, 4, 1, 100, 37, 40, False, False),  # N > M
    (1, 4, 2, 37, 130, 64, True, False),  # N < M causal, bottom-right; GQA 2:1
    (1, 8, 2, 65, 129, 16, False, False),  # GQA 4:1
    (1, 8, 2, 65, 129, 16, True, False),  # GQA 4:1 causal
    (2, 2, 1, 129, 65, 24, False, False),  # D = 24 (padded to 32)
    (1, 1, 1, 17, 1, 16, True, False),  # M = 1 causal: only the last row sees a key
    (1, 2, 2, 64, 64, 64, False, True),  # (B, N, H, D) transposed to (B, H, N, D)
    (1, 4, 2, 96, 80, 32, True, True),  # strided, GQA, causal, N > M
    (1, 2, 2, 64, 128, 64, True, False),  # lengths that are whole blocks
    (1, 2, 2, 128, 64, 64, True, False),
    (1, 2, 1, 33, 45, 96, True, False),  # D = 96 (padded to 128)
]


def _case_id(c):
    b, hq, hkv, n, m, d, causal, transposed = c
    return f"B{b}-H{hq}/{hkv}-N{n}-M{m}-D{d}{'-causal' if causal else ''}{'-strided' if transposed else ''}"


@pytest.mark.parametrize("backend", ["interpret", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_fp32_matches_float64(case, backend):
    b, hq, hkv, n, m, d, causal, transposed = case
    q, k, v, do = make_inputs(b, hq, hkv, n, m, d, torch.float32, "cpu", transposed=transposed)
    if transposed:
        assert not q.is_contiguous()
    errs = errors(q, k, v, do, causal, backend)
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize("backend", ["interpret", "torch"])
@pytest.mark.parametrize("case", [CASES[5], CASES[12]], ids=[_case_id(CASES[5]), _case_id(CASES[12])])
def test_fp16_matches_float64(case, backend):
    b, hq, hkv, n, m, d, causal, transposed = case
    q, k, v, do = make_inputs(b, hq, hkv, n, m, d, torch.float16, "cpu", transposed=transposed)
    errs = errors(q, k, v, do, causal, backend)
    assert all(e < TOLERANCE[torch.float16] for e in errs.values()), errs


@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_explicit_scale(backend):
    q, k, v, do = make_inputs(1, 2, 1, 30, 50, 32, torch.float32, "cpu")
    errs = errors(q, k, v, do, True, backend, scale=0.7)
    assert all(e < 1e-5 for e in errs.values()), errs


def test_every_config_interpreted():
    """Each forward and backward block shape (not only the first, which the interpreter picks) is
    exact: block-size-dependent range arithmetic is what a new config would break."""
    q, k, v, do = make_inputs(1, 4, 2, 130, 100, 32, torch.float32, "cpu")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    scale = 1 / math.sqrt(32)
    fwd, dkdv, dq = fa.FWD_TUNER.configs, fa.DKDV_TUNER.configs, fa.DQ_TUNER.configs
    for i in range(max(len(fwd), len(dkdv), len(dq))):
        out, lse = fa.forward(q.detach(), k.detach(), v.detach(), True, scale, "interpret", fwd[i % len(fwd)])
        assert rel_err(out, ref) < 1e-5, fwd[i % len(fwd)].label()
        grads = fa.backward(do, q.detach(), k.detach(), v.detach(), out, lse, True, scale, "interpret",
                            dkdv[i % len(dkdv)], dq[i % len(dq)])
        for name, g, r in zip("qkv", grads, ref_grads, strict=True):
            assert rel_err(g, r) < 1e-5, (name, dkdv[i % len(dkdv)].label(), dq[i % len(dq)].label())


def test_torch_backend_mask_in_many_blocks(monkeypatch):
    """The torch path builds the bottom-right mask (causal, N < M) a block of rows at a time."""
    monkeypatch.setattr(fa, "TORCH_MASK_ELEMENTS", 7 * 50)  # 7 query rows per block
    q, k, v, do = make_inputs(1, 8, 2, 33, 50, 32, torch.float32, "cpu")
    errs = errors(q, k, v, do, True, "torch")
    assert all(e < 1e-5 for e in errs.values()), errs


def test_expanded_output_gradient():
    """`out.sum().backward()` hands the backward a stride-0 gradient; the kernels read it through its strides."""
    q, k, v, _ = make_inputs(1, 4, 2, 40, 33, 16, torch.float32, "cpu")
    kernels.attention(q, k, v, causal=True, backend="interpret").sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference(q64, k64, v64, True).sum().backward()
    for t, r in ((q, q64), (k, k64), (v, v64)):
        assert rel_err(t.grad, r.grad) < 1e-5


def test_rows_without_keys_give_zero_not_nan():
    # causal, N = 20 > M = 5: queries 0..14 see no key.
    q, k, v, do = make_inputs(1, 2, 1, 20, 5, 16, torch.float32, "cpu")
    for backend in ("interpret", "torch"):
        out = kernels.attention(q, k, v, causal=True, backend=backend)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
        assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
        assert out[:, :, :15].abs().max() == 0 and dq[:, :, :15].abs().max() == 0
        assert out[:, :, 15:].abs().min() > 0
    _, lse = fa.forward(q.detach(), k.detach(), v.detach(), True, 0.25, "interpret")
    assert torch.isneginf(lse[:, :, :15]).all() and torch.isfinite(lse[:, :, 15:]).all()


def test_logsumexp_output():
    q, k, v, _ = make_inputs(2, 4, 2, 50, 70, 32, torch.float32, "cpu")
    _, lse = fa.forward(q.detach(), k.detach(), v.detach(), False, 0.3, "interpret")
    scores = q.detach().double() @ k.detach().double().repeat_interleave(2, 1).transpose(-1, -2) * 0.3
    assert rel_err(lse, torch.logsumexp(scores, -1)) < 1e-6


def test_backward_is_deterministic():
    q, k, v, do = make_inputs(1, 8, 2, 70, 90, 32, torch.float32, "cpu")
    runs = []
    for _ in range(2):
        out = kernels.attention(q, k, v, causal=True, backend="interpret")
        runs.append(torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument
# ----------------------------------------------------------------------------------------------
def _qkv(qs=(1, 4, 8, 16), ks=(1, 2, 8, 16), dtype=torch.float32):
    return torch.randn(qs).to(dtype), torch.randn(ks).to(dtype), torch.randn(ks).to(dtype)


BAD = [
    ("q not a tensor", lambda: ([[1.0]], *_qkv()[1:]), {}, TypeError, "q must be a torch.Tensor"),
    ("3-D k", lambda: (_qkv()[0], torch.randn(2, 8, 16), _qkv()[2]), {}, ValueError, "k must be a 4-D"),
    ("dtype mismatch", lambda: (_qkv()[0], _qkv()[1].half(), _qkv()[2]), {}, TypeError, "k has dtype"),
    ("int dtype", lambda: _qkv(dtype=torch.int32), {}, TypeError, "q has dtype"),
    ("batch mismatch", lambda: _qkv(ks=(2, 2, 8, 16)), {}, ValueError, "k has batch size"),
    ("head dim mismatch", lambda: _qkv(ks=(1, 2, 8, 32)), {}, ValueError, "k has head dim"),
    ("v shape", lambda: (*_qkv()[:2], torch.randn(1, 2, 9, 16)), {}, ValueError, "v has shape"),
    ("Hq % Hkv", lambda: _qkv(ks=(1, 3, 8, 16)), {}, ValueError, "k has 3 heads"),
    ("head dim too big", lambda: _qkv((1, 2, 8, 512), (1, 2, 8, 512)), {}, ValueError, "q has head dim 512"),
    ("negative scale", _qkv, {"scale": -1.0}, ValueError, "scale must be a positive"),
    ("string scale", _qkv, {"scale": "0.1"}, TypeError, "scale must be a positive float"),
    ("causal not bool", _qkv, {"causal": 1}, TypeError, "causal must be a bool"),
    ("unknown backend", _qkv, {"backend": "cuda"}, ValueError, "backend='cuda'"),
    ("triton on CPU", _qkv, {"backend": "triton"}, ValueError, "needs CUDA tensors"),
    ("grid too large", lambda: _qkv((70000, 1, 1, 16), (70000, 1, 1, 16)), {}, ValueError, "batch x heads"),
    ("bf16 interpreted", lambda: _qkv(dtype=torch.bfloat16), {"backend": "interpret"}, TypeError, "bfloat16"),
]


@pytest.mark.parametrize("make,kwargs,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kernels.attention(*make(), **{"backend": "interpret", **kwargs})


# ----------------------------------------------------------------------------------------------
# Integration: torch.library op checks, torch.compile, a tiny transformer trained on CPU
# ----------------------------------------------------------------------------------------------
def test_custom_op_opcheck():
    q, k, v, _ = make_inputs(1, 4, 2, 20, 24, 16, torch.float32, "cpu")
    result = torch.library.opcheck(torch.ops.wb.attention_fwd.default, (q, k, v, True, 0.25, "interpret"))
    assert set(result.values()) == {"SUCCESS"}, result


def test_torch_compile_fullgraph():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return kernels.attention(q, k, v, causal=True, backend="interpret") * 2

    q, k, v, do = make_inputs(1, 4, 2, 24, 24, 16, torch.float32, "cpu")
    compiled = torch.compile(Attn(), fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, True) * 2
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    assert rel_err(out, ref) < 1e-5
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads, strict=True))


class TinyBlock(nn.Module):
    """Pre-norm transformer block with GQA causal attention through kernels.attention."""

    def __init__(self, dim=32, heads=4, kv_heads=2, vocab=50, backend="torch"):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.backend = heads, kv_heads, dim // heads, backend
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        b, n, _ = x.shape
        h = self.norm1(x)
        # (B, N, H, D) viewed as (B, H, N, D): strided inputs, no copy.
        q = self.q(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, n, 2, self.kv_heads, self.head_dim).unbind(2)
        o = kernels.attention(q, k.transpose(1, 2), v.transpose(1, 2), causal=True, backend=self.backend)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, -1))
        x = x + self.mlp(self.norm2(x))
        return self.head(x)


def _train(backend, steps=6):
    torch.manual_seed(0)
    model = TinyBlock(dim=64, heads=4, kv_heads=2, backend=backend)  # head dim 16
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.randint(0, 50, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        logits = model(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_transformer_trains_and_backends_agree():
    interpreted = _train("interpret")
    reference_losses = _train("torch")
    assert interpreted[-1] < interpreted[0] - 0.1, interpreted
    assert all(math.isfinite(x) for x in interpreted)
    assert interpreted == pytest.approx(reference_losses, rel=1e-4), (interpreted, reference_losses)


# ----------------------------------------------------------------------------------------------
# Autotune configs and the ahead-of-time compile for sm_80 / sm_90
# ----------------------------------------------------------------------------------------------
def test_every_head_dim_has_a_config():
    for d in fa.HEAD_DIMS:
        for dtype in fa.KERNEL_DTYPES:
            for kind, tuner in (fa.FP32_TUNERS if dtype == torch.float32 else fa.TUNERS).items():
                assert tuner.candidates(fa._fits(kind, d, dtype, 16384)), (kind, d, dtype)
                assert tuner.candidates(fa._fits(kind, d, dtype, 1)), (kind, d, dtype)


def test_compile_specs_cover_every_config():
    specs = fa.compile_specs()
    for dtype, tuners in (("fp16", fa.TUNERS), ("bf16", fa.TUNERS), ("fp32", fa.FP32_TUNERS)):
        for kind, tuner in tuners.items():
            labels = [s.label for s in specs if s.label.startswith(f"attention {kind} {dtype} ")]
            for c in tuner.configs:
                assert any(label.endswith(c.label()) for label in labels), (kind, dtype, c.label())
    assert all(s.expect_ptx == {90: ("wgmma",)} for s in specs if " fwd " in s.label and "fp32" not in s.label)


@pytest.mark.slow
def test_representative_configs_compile_for_sm80_and_sm90():
    """A representative subset (the full set is `wb kernels compile attention`, too slow for CI):
    forward at the largest tile and at a padded head dim, and both backward kernels, in fp16/bf16."""
    from gpu_workbench.kernels.aot import compile_all

    specs = fa.compile_specs()
    wanted = [
        "attention fwd fp16 D=128 causal=True BLOCK_M=128 BLOCK_N=64 w8 s3",
        "attention fwd bf16 D=96 causal=False BLOCK_M=64 BLOCK_N=32 w4 s2",
        "attention dkdv fp16 D=128 causal=True BLOCK_M=32 BLOCK_N=64 w8 s2",
        "attention dq bf16 D=128 causal=True BLOCK_M=64 BLOCK_N=64 w8 s3",
    ]
    chosen = [s for s in specs if s.label in wanted]
    assert len(chosen) == len(wanted), [s.label for s in specs]
    results = compile_all(chosen, archs=(80, 90))
    failed = [(r.spec.label, r.arch, r.failure) for r in results if not r.passed]
    assert not failed


# ----------------------------------------------------------------------------------------------
# GPU: the compiled kernels (skipped without CUDA)
# ----------------------------------------------------------------------------------------------
GPU_CASES = [
    (2, 8, 8, 1024, 1024, 64, False, False),
    (2, 8, 2, 1000, 1000, 128, True, False),
    (1, 8, 1, 333, 1025, 128, True, True),
    (1, 4, 4, 1025, 333, 96, True, False),
    (1, 4, 2, 513, 2049, 256, False, False),
    (2, 4, 4, 17, 17, 16, True, False),
]


def _naive(q, k, v, causal):
    """The same math in plain PyTorch at the inputs' precision (scores materialised, softmax in fp32)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n, m = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
    if causal:
        hidden = torch.arange(m, device=q.device)[None, :] > torch.arange(n, device=q.device)[:, None] + (m - n)
        s = s.masked_fill(hidden, float("-inf"))
    return torch.softmax(s.float(), -1).nan_to_num(0.0).to(q.dtype) @ v


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[_case_id(c) for c in GPU_CASES])
def test_gpu_flash_attention_rule(case, dtype):
    """Kernel error vs an fp32 reference is at most 2x that of the same math in plain PyTorch at
    the same precision (the FlashAttention test rule), for the output and all three gradients."""
    b, hq, hkv, n, m, d, causal, transposed = case
    q, k, v, do = make_inputs(b, hq, hkv, n, m, d, dtype, "cuda", transposed=transposed)
    out = kernels.attention(q, k, v, causal=causal, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _naive(q32, k32, v32, causal)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    low = _naive(ql, kl, vl, causal)
    low_grads = torch.autograd.grad(low, (ql, kl, vl), do)
    for name, ours, theirs, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (low, *low_grads),
                                     (ref, *ref_grads), strict=True):
        mine, baseline = (ours.float() - r).abs().max().item(), (theirs.float() - r).abs().max().item()
        assert mine <= 2 * baseline + 1e-5, (name, mine, baseline)
        assert rel_err(ours, r) < TOLERANCE[dtype], (name, rel_err(ours, r))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[_case_id(c) for c in GPU_CASES])
def test_gpu_fp32_matches_float64(case):
    b, hq, hkv, n, m, d, causal, transposed = case
    q, k, v, do = make_inputs(b, hq, hkv, n, m, d, torch.float32, "cuda", transposed=transposed)
    errs = errors(q, k, v, do, causal, "triton")
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    q, k, v, do = make_inputs(2, 16, 2, 2048, 2048, 128, torch.bfloat16, "cuda")
    runs = []
    for _ in range(3):
        out = kernels.attention(q, k, v, causal=True, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v), do))
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)
