"""Document-masked self-attention for packed sequences: attention never crosses a document boundary.

    o = document_attention(q, k, v, docs, causal=True, scale=None, backend=None)
    q: (B, Hq, N, D); k, v: (B, Hkv, N, D) (self-attention: as many keys as queries; GQA as attention());
    docs: (B, N) integer document number of each token, nondecreasing along each row (a packed window:
    documents concatenated). Query i sees key j iff docs[b, i] == docs[b, j] (and j <= i when causal).

Backends as kernels.attention: "triton" / "interpret" run kernels/jit/doc_attention.py (forward and a
deterministic backward, custom ops `wb::doc_attention_fwd` / `wb::doc_attention_bwd`, so torch.compile traces
through); "torch" gives PyTorch's scaled_dot_product_attention the boolean mask (differentiable by torch).
The Triton programs skip the key blocks their rows' documents do not reach (see the kernel file).
"""

from __future__ import annotations

import importlib
import math

import torch

from gpu_workbench.kernels import jit_loader
from gpu_workbench.kernels.aot import CompileSpec, triton_type
from gpu_workbench.kernels.autotune import Config
from gpu_workbench.kernels.launch import cdiv

# the module, not kernels.attention (the package exports the function under the module's name)
fa = importlib.import_module("gpu_workbench.kernels.attention")


def _validate_docs(docs, q) -> torch.Tensor:
    if not isinstance(docs, torch.Tensor):
        raise TypeError(f"docs must be a tensor, got {type(docs).__name__}")
    if docs.dtype.is_floating_point or docs.dtype == torch.bool or docs.dim() != 2:
        raise ValueError(f"docs must be a (B, N) integer tensor, got {docs.dtype} of shape {tuple(docs.shape)}")
    if tuple(docs.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"docs has shape {tuple(docs.shape)}; expected (B, N) = {(q.shape[0], q.shape[2])}")
    if docs.device != q.device:
        raise ValueError(f"docs is on {docs.device} but q is on {q.device}")
    if docs.shape[1] > 1 and bool((docs[:, 1:] < docs[:, :-1]).any()):
        raise ValueError("docs must be nondecreasing along each row (documents packed one after another)")
    return docs.to(torch.int32).contiguous()


def document_bounds(docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first position, one past the last position) of each token's document, (B, N) int32 each."""
    b, n = docs.shape
    pos = torch.arange(n, device=docs.device, dtype=torch.int32).expand(b, n)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    lo = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    hi = torch.where(ends, pos + 1, torch.full_like(pos, n)).flip(1).cummin(dim=1).values.flip(1)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


# 16-bit configs chosen here instead of the plain attention's first admitted one, where the document bounds'
# extra live registers made that one spill in the AOT sweep (BENCHMARKS.md, document-masked attention):
# dK/dV at D=33..64 (keyed by the padded head dim), where 32x64 w8 s2 spilled 8 B on sm_80 under Triton 3.6
# and 16x32 w8 s2 spilled 16 B on sm_90 under 3.9; 32x32 w4 s2 took 128-144 registers, no spill, on both.
OVERRIDES = {("dkdv", 64): Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)}


def _configs(backend: str, dtype: torch.dtype, head_dim: int = 64) -> dict:
    """One config per kernel: the interpreter's small tiles, or on a GPU the plain attention's first config
    that its register and shared-memory budgets admit at this head dim (the same tiles, so the same limits),
    unless OVERRIDES names one."""
    if backend != "triton":
        return {kind: fa.TUNERS[kind].configs[0] for kind in ("fwd", "dkdv", "dq")}
    if dtype == torch.float32:
        return {kind: fa.FP32_TUNERS[kind].configs[0] for kind in ("fwd", "dkdv", "dq")}
    return {kind: OVERRIDES.get((kind, fa._block_d(head_dim))) or next(
        (c for c in fa.TUNERS[kind].configs if fa._fits(kind, head_dim, dtype)(c)), fa.TUNERS[kind].configs[-1])
        for kind in ("fwd", "dkdv", "dq")}


def forward(q, k, v, docs, causal: bool, scale: float, backend: str):
    jit = jit_loader.kernels_for("doc_attention", backend)
    B, Hq, N, D = q.shape
    lo, hi = document_bounds(docs)
    out = fa._new((B, Hq, N, D), q)
    lse = fa._new((B, Hq, N), q, torch.float32)
    c = _configs(backend, q.dtype, D)["fwd"]
    jit.attn_doc_fwd[(cdiv(N, c.meta["BLOCK_M"]), B * Hq)](
        q, k, v, out, lse, docs, lo, hi, N, Hq, Hq // k.shape[1],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), scale * math.log2(math.e),
        CAUSAL=causal, D=D, BLOCK_D=fa._block_d(D), **c.launch_options())
    return out, lse


def backward(do, q, k, v, out, lse, docs, causal: bool, scale: float, backend: str):
    jit = jit_loader.kernels_for("doc_attention", backend)
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    lo, hi = document_bounds(docs)
    delta = (do.float() * out.float()).sum(-1).contiguous()   # rowsum(dO * O), fp32 (B, Hq, N)
    dq, dk, dv = fa._new(q.shape, q), fa._new(k.shape, k), fa._new(v.shape, v)
    cfg, qk_scale, block_d = _configs(backend, q.dtype, D), scale * math.log2(math.e), fa._block_d(D)
    c = cfg["dkdv"]
    jit.attn_doc_bwd_dkdv[(cdiv(N, c.meta["BLOCK_N"]), B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, docs, lo, hi, N, Hq, Hkv, Hq // Hkv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), qk_scale, scale,
        CAUSAL=causal, D=D, BLOCK_D=block_d, **c.launch_options())
    c = cfg["dq"]
    jit.attn_doc_bwd_dq[(cdiv(N, c.meta["BLOCK_M"]), B * Hq)](
        q, k, v, do, dq, lse, delta, docs, lo, hi, N, Hq, Hq // Hkv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), qk_scale, scale,
        CAUSAL=causal, D=D, BLOCK_D=block_d, **c.launch_options())
    return dq, dk, dv


@torch.library.custom_op("wb::doc_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor, causal: bool, scale: float,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(q, k, v, docs, causal, scale, backend)


@_fwd_op.register_fake
def _(q, k, v, docs, causal, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("wb::doc_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, docs: torch.Tensor, causal: bool, scale: float,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(do.to(q.dtype).contiguous(), q, k, v, out, lse, docs, causal, scale, backend)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, docs, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, docs, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, docs)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, docs = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, docs, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _torch(q, k, v, docs, causal: bool, scale: float) -> torch.Tensor:
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    visible = docs[:, None, :, None] == docs[:, None, None, :]                  # (B, 1, N, N)
    if causal:
        n = docs.shape[1]
        visible = visible & torch.ones(n, n, dtype=torch.bool, device=docs.device).tril()
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return sdpa(q, k, v, attn_mask=visible, scale=scale, **gqa)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor, causal: bool = True,
                       scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked to each token's own document [and causal]) v, differentiable."""
    chosen, scale = fa._validate(q, k, v, causal, scale, backend)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k has {k.shape[2]} keys but q has {q.shape[2]} queries; document masks are for "
                         f"self-attention over one packed sequence")
    docs = _validate_docs(docs, q)
    if chosen == "torch" or q.shape[2] == 0:
        return _torch(q, k, v, docs, causal, scale)
    out, _ = _fwd_op(q, k, v, docs, causal, scale, chosen)
    return out


# Every (kernel, dtype, head dim) the launcher may compile on a GPU, for the ahead-of-time check
# (kernels/aot.py: compiles for sm_80 and sm_90 on a CPU machine and fails on a register spill).
_POINTERS = {"attn_doc_fwd": ("q", "k", "v", "o", "lse", "docs", "lo", "hi"),
             "attn_doc_bwd_dkdv": ("q", "k", "v", "do", "dk", "dv", "lse", "delta", "docs", "lo", "hi"),
             "attn_doc_bwd_dq": ("q", "k", "v", "do", "dq", "lse", "delta", "docs", "lo", "hi")}
_KIND = {"attn_doc_fwd": "fwd", "attn_doc_bwd_dkdv": "dkdv", "attn_doc_bwd_dq": "dq"}


def _signature(fn: str, dtype: torch.dtype) -> dict:
    names = list(getattr(jit_loader.load("doc_attention", interpret=False), fn).arg_names)
    kinds = {"lse": "*fp32", "delta": "*fp32", "docs": "*i32", "lo": "*i32", "hi": "*i32"}
    sig = {}
    for name in names:
        base = name.removesuffix("_ptr")
        if name.endswith("_ptr"):
            sig[name] = kinds.get(base, triton_type(dtype))
        elif name in ("CAUSAL", "D", "BLOCK_D", "BLOCK_M", "BLOCK_N") or (name.startswith("stride_")
                                                                           and name.endswith("d")):
            sig[name] = "constexpr"
        else:
            sig[name] = "fp32" if name in ("qk_scale", "sm_scale") else "i32"
    return sig


def compile_specs(dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=(64, 128)) -> list[CompileSpec]:
    specs = []
    for dtype in dtypes:
        for d in head_dims:
            configs = _configs("triton", dtype, d)
            for fn, kind in _KIND.items():
                c, sig = configs[kind], _signature(fn, dtype)
                consts = {"CAUSAL": True, "D": d, "BLOCK_D": fa._block_d(d), **c.meta,
                          **{n: 1 for n in sig if n.startswith("stride_") and n.endswith("d")}}
                aligned = tuple(n for n, t in sig.items() if t == "i32" and (n.startswith("stride_") or n == "N"))
                specs.append(CompileSpec("doc_attention", fn, sig, consts, c.num_warps, c.num_stages,
                                         f"doc_attention {kind} {triton_type(dtype)[1:]} D={d} {c.label()}",
                                         aligned=aligned))
    return specs
