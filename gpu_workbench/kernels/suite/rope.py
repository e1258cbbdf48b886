"""Rotary position embedding: correctness sweep, benchmark, compile specs."""

from __future__ import annotations

import torch

from gpu_workbench import kernels
from gpu_workbench.kernels.rope import compile_specs  # noqa: F401  (part of this module's interface)
from gpu_workbench.kernels.suite import memory_bound as mb
from gpu_workbench.kernels.suite.common import TOLERANCE, CheckRow, dtype_name, rel_err

THETA = 500.0  # small: angles of every size on short test sequences
# (B, Hq, Hk, T, D, q transposed from (B, T, H, D) as the model's projections give it): one token, odd
# head counts (GQA) and lengths, a head dim that is no power of two, an empty sequence.
SMALL_CASES = [(1, 1, 1, 1, 2, False), (2, 5, 3, 7, 18, True), (1, 4, 2, 33, 32, True), (1, 3, 1, 0, 8, False)]
GPU_CASES = SMALL_CASES + [(1, 32, 8, 8192, 128, True), (4, 12, 4, 1000, 96, False)]


def angles(positions: torch.Tensor, head_dim: int, theta: float = THETA) -> torch.Tensor:
    half = head_dim // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    return positions.double()[:, None] * freq[None, :]


def reference(x: torch.Tensor, positions: torch.Tensor, convention: str, theta: float = THETA) -> torch.Tensor:
    """Interleaved pairs as the model's rotate (parallel/models/transformer.py), halves as Hugging Face's
    rotate_half, in the input's precision."""
    angle = angles(positions, x.shape[-1], theta).to(torch.promote_types(x.dtype, torch.float32))
    cos, sin = angle.cos(), angle.sin()
    h = x.to(cos.dtype)
    if convention == "interleaved":
        even, odd = h[..., 0::2], h[..., 1::2]
        out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = h[..., :half], h[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)
    return out.to(x.dtype)


def make_inputs(b, hq, hk, t, d, transposed: bool, dtype, device, gen):
    q = torch.randn(b, t, hq, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    q = q if transposed else q.contiguous()
    k = torch.randn(b, hk, t, d, generator=gen, dtype=torch.float64)
    return q.to(dtype).to(device), k.to(dtype).to(device), (torch.arange(t) * 3 + 1).to(device)


def errors(q, k, positions, convention: str, backend: str, gen) -> dict:
    qs, ks = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = kernels.rope(qs, ks, positions, THETA, convention=convention, backend=backend)
    dq_out, dk_out = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
                      for t in (qo, ko))
    dq, dk = torch.autograd.grad((qo, ko), (qs, ks), (dq_out, dk_out))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qr, kr = reference(q64, positions, convention), reference(k64, positions, convention)
    dq64, dk64 = torch.autograd.grad((qr, kr), (q64, k64), (dq_out.double(), dk_out.double()))
    return {"q": rel_err(qo, qr), "k": rel_err(ko, kr), "dq": rel_err(dq, dq64), "dk": rel_err(dk, dk64)}


def check(backend: str, seed: int = 0) -> list[CheckRow]:
    device = "cuda" if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b, hq, hk, t, d, transposed in GPU_CASES if backend == "triton" else SMALL_CASES:
        for convention in ("interleaved", "half"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                q, k, pos = make_inputs(b, hq, hk, t, d, transposed, dtype, device, gen)
                case = f"B{b} Hq{hq} Hk{hk} T{t} D{d}{' q strided' if transposed else ''} {convention}"
                rows.append(CheckRow("rope", case, backend, dtype_name(dtype),
                                     errors(q, k, pos, convention, backend, gen), TOLERANCE[dtype]))
    return rows


def _rotate_half_eager(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb: cos/sin (T, D), the angles repeated over both halves."""
    def rot(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), -1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def bench(device: str, quick: bool = False) -> list:
    """Forward and forward + backward of q (1, 32, 8192, 128) and k (1, 8, 8192, 128): q is 8192 x 4096.
    Rotate-half, the convention Liger implements; its and eager's cos/sin tables are made once, outside the
    timing (a model shares them across layers); wb's are made inside each call."""
    backend = "triton" if device == "cuda" else "torch"
    b, hq, hk, t, d = (1, 32, 8, 8192, 128) if device == "cuda" else (1, 8, 2, 256, 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k = torch.randn(b, hq, t, d, device=device, dtype=dtype), torch.randn(b, hk, t, d, device=device, dtype=dtype)
    pos = torch.arange(t, device=device)
    angle = angles(pos, d, 10000.0).float()
    cos, sin = (torch.cat((f(angle), f(angle)), -1).to(dtype) for f in (torch.cos, torch.sin))
    impls = {"wb": lambda a, c: kernels.rope(a, c, pos, 10000.0, convention="half", backend=backend),
             mb.EAGER: lambda a, c: _rotate_half_eager(a, c, cos, sin)}
    if device == "cuda":
        impls["torch.compile"] = mb.compiled(lambda a, c: _rotate_half_eager(a, c, cos, sin))
        if mb.liger_installed():
            from liger_kernel.transformers.rope import liger_rotary_pos_emb

            impls[mb.LIGER] = lambda a, c: liger_rotary_pos_emb(a, c, cos[None], sin[None])
    copy, case = mb.copy_gbs(device, quick), f"q{tuple(q.shape)} k{tuple(k.shape)}"
    size = (q.numel() + k.numel()) * q.element_size()
    grads = (torch.randn_like(q), torch.randn_like(k))
    fwd = {name: (lambda f=f: f(q, k)) for name, f in impls.items()}
    both = {name: mb.fwd_bwd(f, [q, k], grads) for name, f in impls.items()}
    return (mb.rows_for("rope", "fwd", case, dtype, device, fwd, 2 * size, copy)
            + mb.rows_for("rope", "fwd+bwd", case, dtype, device, both, 4 * size, copy))
