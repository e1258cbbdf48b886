"""Document-masked attention: correctness sweep, benchmark, compile specs."""

from __future__ import annotations

from functools import partial

import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.doc_attention import compile_specs  # noqa: F401  (part of this module's interface)
from gpu_workbench.kernels.suite.attention import make_inputs
from gpu_workbench.kernels.suite.common import (
    TOLERANCE,
    BenchRow,
    CheckRow,
    device_and_dtypes,
    dtype_name,
    rel_err,
    time_ms,
)


def reference(q, k, v, docs, causal: bool) -> torch.Tensor:
    """Float64 attention with the N x N mask materialised: a key is visible when it is in the query's document
    (and not after it, when causal). Every query sees at least itself."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    visible = docs[:, None, :, None] == docs[:, None, None, :]
    if causal:
        visible = visible & torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v


def packed(batch: int, n: int, lengths: list[int]) -> torch.Tensor:
    """(batch, n) document numbers: documents of these lengths one after another (a 0 is an empty document,
    its number skipped), the rest of the row one last document."""
    row = [i for i, length in enumerate(lengths) for _ in range(length)]
    return torch.tensor((row + [len(lengths)] * n)[:n]).expand(batch, n).contiguous()


def errors(q, k, v, do, docs, causal: bool, backend: str) -> dict:
    out = kernels.document_attention(q, k, v, docs, causal=causal, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, docs.cpu(), causal)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.cpu().double())
    names = ("out", "dq", "dk", "dv")
    return {n: rel_err(a, b) for n, a, b in zip(names, (out, *grads), (ref, *ref_grads), strict=True)}


# (B, Hq, Hkv, N, D, document lengths, causal): one-token and empty documents, one document, odd lengths across
# several row and key blocks, GQA, a non-power-of-two head dim.
SMALL_CASES = [
    (1, 1, 1, 1, 16, [1], True),
    (2, 2, 1, 101, 24, [3, 1, 0, 40, 1, 1, 30], True),
    (1, 4, 2, 77, 32, [77], False),
    (1, 2, 2, 130, 64, [1] * 5 + [64], True),
]
GPU_CASES = SMALL_CASES + [
    (2, 8, 2, 2048, 128, [300, 1, 700, 0, 1000], True),
    (1, 4, 4, 4095, 64, [17] * 200, True),
]


def check(backend: str, seed: int = 0) -> list[CheckRow]:
    device, dtypes = device_and_dtypes(backend)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b, hq, hkv, n, d, lengths, causal in GPU_CASES if backend == "triton" else SMALL_CASES:
        docs = packed(b, n, lengths).to(device)
        for dtype in dtypes:
            q, k, v, do = make_inputs(b, hq, hkv, n, n, d, dtype, device, gen)
            case = f"B{b} H{hq}/{hkv} N{n} D{d} docs={len(lengths)}{' causal' if causal else ''}"
            rows.append(CheckRow("doc_attention", case, backend, dtype_name(dtype),
                                 errors(q, k, v, do, docs, causal, backend), TOLERANCE[dtype]))
    return rows


def _fwd_bwd_ms(attn, q, k, v, do, device: str):
    """Median ms of attn(q, k, v).backward(do)."""
    def step():
        q.grad = k.grad = v.grad = None
        attn(q, k, v).backward(do)
    return time_ms(step, device)


def bench(device: str, quick: bool = False) -> list[BenchRow]:
    """Forward + backward of causal attention over packed rows of documents, masked (the documents' blocks
    only) beside the plain causal kernel on the same rows: the masked kernel skips the key blocks of other
    documents, so with many short documents it should take a fraction of the plain kernel's time."""
    backend = "triton" if device == "cuda" else "torch"
    b, h, n, d, dtype = (4, 16, 8192, 128, torch.bfloat16) if device == "cuda" else (1, 4, 512, 64, torch.float32)
    rows = []
    for doc_len in ([n // 8] if quick else [n // 32, n // 8, n]):
        q, k, v, do = make_inputs(b, h, h, n, n, d, dtype, device)
        docs = packed(b, n, [doc_len] * (n // doc_len)).to(device)
        masked = _fwd_bwd_ms(partial(kernels.document_attention, docs=docs, backend=backend), q, k, v, do, device)
        plain = _fwd_bwd_ms(partial(kernels.attention, causal=True, backend=backend), q, k, v, do, device)
        rows.append(BenchRow("doc_attention fwd+bwd", f"B{b} H{h} N{n} D{d} documents of {doc_len}",
                             dtype_name(dtype), masked, {"plain causal ms": plain, "vs plain": plain / masked}))
    return rows
