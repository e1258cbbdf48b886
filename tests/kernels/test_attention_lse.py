"""attention_forward (out, lse) and attention_backward with the block's own or an external (merged) out and
lse, against float64: the torch backend and the Triton kernels under the interpreter (small shapes: slow)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.suite.attention import make_inputs, reference
from gpu_workbench.kernels.suite.common import rel_err

# the launcher module (gpu_workbench.kernels.attention as an attribute is the function of that name)
fa = importlib.import_module("gpu_workbench.kernels.attention")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Fresh kernel outputs start as NaN: an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(fa, "POISON_OUTPUTS", True)


BACKENDS = ["torch", "interpret", pytest.param("triton", marks=pytest.mark.gpu)]


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" else "cpu"
# (B, Hq, Hkv, N, M, D, causal): odd heads, GQA 6/2 and 3/1, N != M both ways, rows that see no key (N > M causal)
CASES = [
    (2, 3, 3, 17, 17, 32, True),
    (1, 6, 2, 9, 23, 16, False),
    (1, 3, 1, 20, 7, 24, True),
    (1, 6, 2, 13, 29, 40, True),
]


def _ref_lse(q, k, causal: bool) -> torch.Tensor:
    """float64 logsumexp of the scaled, bottom-right-masked scores (K repeated per query head)."""
    q, k = q.detach().cpu().double(), k.detach().cpu().double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    n, m = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.arange(m)[None, :] > torch.arange(n)[:, None] + (m - n), float("-inf"))
    return torch.logsumexp(s, -1)


def _ref_grads(q, k, v, do, causal: bool):
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    out = reference(q64, k64, v64, causal)
    return out, torch.autograd.grad(out, (q64, k64, v64), do.cpu().double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}/{}-N{}-M{}-D{}{}".format(*c[:6], "-causal" * c[6]))
def test_forward_and_backward_match_float64(case, backend):
    b, hq, hkv, n, m, d, causal = case
    q, k, v, do = make_inputs(b, hq, hkv, n, m, d, torch.float32, _device(backend))
    out, lse = kernels.attention_forward(q, k, v, causal=causal, backend=backend)
    out_cpu, lse = out.cpu(), lse.cpu()
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, n) and not out.requires_grad
    ref_out, ref_grads = _ref_grads(q, k, v, do, causal)
    ref_lse = _ref_lse(q, k, causal)
    hidden = torch.isinf(ref_lse)
    assert bool(hidden.any()) == (causal and n > m)   # rows with no key exist exactly in the N > M causal case
    assert torch.equal(torch.isinf(lse), hidden) and (lse[hidden] < 0).all()   # -inf exactly where no key is seen
    assert rel_err(out_cpu, ref_out) < 1e-5 and rel_err(lse[~hidden], ref_lse[~hidden]) < 1e-6
    if causal:
        assert (out_cpu[:, :, :max(0, n - m)] == 0).all()
    grads = kernels.attention_backward(do, q, k, v, out, lse.to(q.device), causal=causal, backend=backend)
    errs = {name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)}
    assert all(e < 1e-5 for e in errs.values()), errs


def _merge(parts):
    """The log-sum-exp merge of per-block (out, lse): the attention over all the blocks' keys."""
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    out = sum(o.double() * torch.exp(l - safe)[..., None] for o, l in parts)
    return out.float(), lse


# (B, Hq, Hkv, N, M1, M2, D, causal): causal keeps N <= M2 + 1, so the first block is entirely visible (full,
# as an earlier ring chunk) and the second is the bottom-right causal one (N = M2: the ring's diagonal block)
SPLITS = [
    (1, 3, 3, 11, 6, 11, 16, True),
    (2, 6, 2, 7, 13, 9, 24, True),
    (1, 3, 1, 10, 5, 14, 16, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "B{}-H{}/{}-N{}-M{}+{}-D{}{}".format(*s[:7], "-causal" * s[7]))
def test_backward_with_merged_out_and_lse_sums_to_the_full_gradient(split, backend):
    b, hq, hkv, n, m1, m2, d, causal = split
    q, k, v, do = make_inputs(b, hq, hkv, n, m1 + m2, d, torch.float32, _device(backend))
    blocks = [(k[:, :, :m1], v[:, :, :m1], False), (k[:, :, m1:], v[:, :, m1:], causal)]
    parts = [kernels.attention_forward(q, kb, vb, causal=c, backend=backend) for kb, vb, c in blocks]
    out, lse = _merge(parts)
    ref_out, (ref_dq, ref_dk, ref_dv) = _ref_grads(q, k, v, do, causal)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse.cpu(), _ref_lse(q, k, causal)) < 1e-6
    grads = [kernels.attention_backward(do, q, kb, vb, out, lse, causal=c, backend=backend) for kb, vb, c in blocks]
    dq = grads[0][0] + grads[1][0]
    dk, dv = torch.cat([grads[0][1], grads[1][1]], 2), torch.cat([grads[0][2], grads[1][2]], 2)
    errs = {"dq": rel_err(dq, ref_dq), "dk": rel_err(dk, ref_dk), "dv": rel_err(dv, ref_dv)}
    assert all(e < 1e-5 for e in errs.values()), errs
    # the block's own out/lse would give other gradients: the external ones are really used
    own = kernels.attention_backward(do, q, *blocks[0][:2], *parts[0], causal=False, backend=backend)
    assert rel_err(own[1], grads[0][1]) > 1e-3


def test_torch_path_chunks_query_rows(monkeypatch):
    """Chunked over query rows (7 at a time here) the torch path gives what one chunk gives."""
    q, k, v, do = make_inputs(1, 6, 2, 30, 20, 16, torch.float32, "cpu")
    whole = kernels.attention_forward(q, k, v, causal=True, backend="torch")
    whole_grads = kernels.attention_backward(do, q, k, v, *whole, causal=True, backend="torch")
    monkeypatch.setattr(fa, "TORCH_MASK_ELEMENTS", 6 * 7 * 20)
    assert len(fa._row_chunks(q, 20)) == 5
    chunked = kernels.attention_forward(q, k, v, causal=True, backend="torch")
    chunked_grads = kernels.attention_backward(do, q, k, v, *chunked, causal=True, backend="torch")
    for a, b in zip((*whole, *whole_grads), (*chunked, *chunked_grads), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_float64_stays_float64_on_the_torch_path():
    q, k, v, do = make_inputs(1, 2, 1, 5, 8, 16, torch.float64, "cpu")
    out, lse = kernels.attention_forward(q, k, v, causal=True, backend="torch")
    assert out.dtype == lse.dtype == torch.float64
    assert rel_err(lse, _ref_lse(q, k, True)) < 1e-12
    dq, dk, dv = kernels.attention_backward(do, q, k, v, out, lse, causal=True, backend="torch")
    assert all(rel_err(g, r) < 1e-12 for g, r in zip((dq, dk, dv), _ref_grads(q, k, v, do, True)[1], strict=True))


@pytest.mark.parametrize("bad, message", [
    ({"lse": torch.zeros(1, 2, 4)}, "lse has shape"),
    ({"out": torch.zeros(1, 2, 5, 8)}, "out has shape"),
    ({"do": torch.zeros(1, 2, 4, 8)}, "do has shape"),
    ({"lse": torch.zeros(1, 2, 5, dtype=torch.float16)}, "lse has dtype"),
    ({"lse": [0.0]}, "lse must be a torch.Tensor"),
])
def test_backward_errors_name_the_argument(bad, message):
    q, k, v, do = make_inputs(1, 2, 1, 5, 8, 16, torch.float32, "cpu")
    args = {"do": do, "out": torch.zeros_like(q), "lse": torch.zeros(1, 2, 5), **bad}
    with pytest.raises((ValueError, TypeError), match=message):
        kernels.attention_backward(args["do"], q, k, v, args["out"], args["lse"], backend="torch")


def test_torch_path_keeps_fp32_math_under_autocast():
    """Inside a bf16 autocast region (a model's forward) the torch path's matmuls stay fp32."""
    q, k, v, do = make_inputs(1, 3, 1, 9, 9, 16, torch.float32, "cpu")
    plain = kernels.attention_forward(q, k, v, causal=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = kernels.attention_forward(q, k, v, causal=True, backend="torch")
        grads = kernels.attention_backward(do, q, k, v, *inside, causal=True, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(plain, inside, strict=True))
    assert all(g.dtype == torch.float32 for g in grads)
    assert rel_err(grads[0], _ref_grads(q, k, v, do, True)[1][0]) < 1e-5
