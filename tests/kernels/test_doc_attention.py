"""Document-masked attention (kernels.document_attention): the Triton kernels through the interpreter and the
torch path against a float64 reference, forward and backward, fp32 and fp16, causal and not, on odd lengths,
one-token documents, document numbers that skip (empty documents) and a single document; the key blocks of
other documents are never read; an unmasked run differs (the negative control)."""

from __future__ import annotations

import importlib

import pytest
import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.doc_attention import document_bounds

fa = importlib.import_module("gpu_workbench.kernels.attention")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Fresh outputs start as NaN: an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(fa, "POISON_OUTPUTS", True)


def _docs(n: int, lengths: list[int]) -> list[int]:
    """Document numbers of a packed row: documents of these lengths (0 = an empty document, its number skipped)."""
    out = [i for i, length in enumerate(lengths) for _ in range(length)]
    return (out + [len(lengths)] * n)[:n]


N = 101   # odd; over one interpreter block of rows (64) and three of keys (32)
DOCS = torch.tensor([_docs(N, [3, 1, 0, 40, 1, 1, 30]), _docs(N, [N]), _docs(N, [1] * 7 + [60])])


def reference(q, k, v, docs, causal):
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    visible = docs[:, None, :, None] == docs[:, None, None, :]
    if causal:
        visible = visible & torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    s = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~visible, float("-inf"))
    return torch.softmax(s, -1) @ v


def _inputs(dtype, n=N, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, 2, n, 24), (batch, 1, n, 24), (batch, 1, n, 24), (batch, 2, n, 24)]   # GQA 2:1, D=24 padded
    q, k, v, do = (torch.randn(s, generator=g).to(dtype) for s in shapes)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def _errors(q, k, v, do, docs, causal, backend) -> list[float]:
    want = reference(q, k, v, docs, causal)
    grads_want = torch.autograd.grad(want, (q, k, v), do.double())
    got = kernels.document_attention(q, k, v, docs, causal=causal, backend=backend)
    grads = torch.autograd.grad(got, (q, k, v), do)
    return [float((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0))   # dq of one key is exactly 0
            for a, b in zip((got, *grads), (want, *grads_want), strict=True)]


@pytest.mark.parametrize("backend", ["interpret", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_float64_forward_and_backward(backend, dtype, causal):
    q, k, v, do = _inputs(dtype)
    errs = _errors(q, k, v, do, DOCS, causal, backend)
    assert all(e < (2e-6 if dtype == torch.float32 else 4e-3) for e in errs), errs


@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_one_token_and_empty_sequences(backend):
    for n in (1, 0):
        q, k, v, do = _inputs(torch.float32, n=n, batch=2)
        docs = torch.zeros(2, n, dtype=torch.long)
        out = kernels.document_attention(q, k, v, docs, backend=backend)
        assert out.shape == q.shape
        if n:   # one token sees itself: attention is v, repeated over the query group
            assert torch.allclose(out, v.repeat_interleave(2, 1), atol=1e-6)
            assert max(_errors(q, k, v, do, docs, True, backend)) < 2e-6


def test_blocks_of_other_documents_are_never_read():
    """Rows 70.. are one document from 70 on: the last row block (128..) starts its keys at block 64; keys
    0..63 hold NaN and its rows stay finite and exact."""
    q, k, v, _ = _inputs(torch.float32, n=130, batch=1)
    docs = torch.tensor([_docs(130, [70, 60])])
    clean = kernels.document_attention(q, k, v, docs, backend="interpret")
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, :64], v2[:, :, :64] = float("nan"), float("nan")
    poisoned = kernels.document_attention(q.detach(), k2, v2, docs, backend="interpret")
    assert torch.equal(poisoned[:, :, 128:], clean[:, :, 128:].detach())
    assert poisoned[:, :, :64].isnan().all()   # those rows do read them: the poison is real


def test_unmasked_attention_differs():
    """Negative control: plain causal attention over the packed row is far from the document-masked one."""
    q, k, v, _ = _inputs(torch.float32)
    plain = kernels.attention(q, k, v, causal=True, backend="interpret")
    assert (plain.double() - reference(q, k, v, DOCS, True)).abs().max() > 0.1


def test_document_bounds_and_errors():
    lo, hi = document_bounds(torch.tensor([[0, 0, 2, 3, 3, 3]]))
    assert lo.tolist() == [[0, 0, 2, 3, 3, 3]] and hi.tolist() == [[2, 2, 3, 6, 6, 6]]
    q, k, v, _ = _inputs(torch.float32, n=5, batch=1)
    with pytest.raises(ValueError, match="nondecreasing"):
        kernels.document_attention(q, k, v, torch.tensor([[0, 1, 0, 1, 1]]))
    with pytest.raises(ValueError, match=r"docs has shape \(1, 4\)"):
        kernels.document_attention(q, k, v, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        kernels.document_attention(q, k, v, torch.zeros(1, 5))
