"""rms_norm, rope and swiglu trace under torch.compile(fullgraph=True) through their custom ops (fake
implementations and autograd registrations), and each op passes torch.library.opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_workbench import kernels
from gpu_workbench.kernels.suite.common import rel_err
from gpu_workbench.kernels.suite.rms_norm import reference as rms_reference
from gpu_workbench.kernels.suite.rope import reference as rope_reference


def _block(x, w, w_q, w_k, w_gate, w_up, positions, backend, fused=True):
    """A llama block's memory-bound part: norm, q/k projections rotated, a SwiGLU product."""
    h = kernels.rms_norm(x, w, 1e-5, backend=backend) if fused else rms_reference(x, w)
    B, T, _ = x.shape
    q, k = ((h @ m).view(B, T, -1, 8).transpose(1, 2) for m in (w_q, w_k))
    if fused:
        q, k = kernels.rope(q, k, positions, 500.0, backend=backend)
        mlp = kernels.swiglu(h @ w_gate, h @ w_up, backend=backend)
    else:
        q, k = rope_reference(q, positions, "interleaved"), rope_reference(k, positions, "interleaved")
        mlp = F.silu(h @ w_gate) * (h @ w_up)
    return q.square().mean() + k.abs().mean() + mlp.square().mean()


def test_torch_compile_fullgraph_through_the_custom_ops():
    """Through the interpreter's kernels (the torch path goes through the very same custom ops)."""
    backend = "interpret"
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 5, 32), (32,), (32, 32), (32, 16), (32, 40), (32, 40)]
    leaves = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    positions = torch.arange(5) + 1
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves, positions, backend)
    grads = torch.autograd.grad(out, leaves)
    ref = _block(*leaves, positions, backend, fused=False)
    ref_grads = torch.autograd.grad(ref, leaves)
    assert rel_err(out, ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads, strict=True))


@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_custom_ops_pass_opcheck(backend):
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    x, w = torch.randn(5, 12, requires_grad=True), torch.randn(12, requires_grad=True)
    torch.library.opcheck(torch.ops.wb.rms_norm_fwd.default, (x, w, 1e-5, backend), test_utils=utils)
    _, rstd = torch.ops.wb.rms_norm_fwd(x, w, 1e-5, backend)
    torch.library.opcheck(torch.ops.wb.rms_norm_bwd.default, (torch.randn(5, 12), x.detach(), w.detach(), rstd,
                                                             backend), test_utils=utils[:2])
    g, u = torch.randn(30, requires_grad=True), torch.randn(30, requires_grad=True)
    torch.library.opcheck(torch.ops.wb.swiglu_fwd.default, (g, u, backend), test_utils=utils)
    torch.library.opcheck(torch.ops.wb.swiglu_bwd.default, (torch.randn(30), g.detach(), u.detach(), backend),
                          test_utils=utils[:2])
    q, k = torch.randn(1, 3, 4, 8, requires_grad=True), torch.randn(1, 1, 4, 8, requires_grad=True)
    cos, sin = torch.randn(4, 4), torch.randn(4, 4)
    torch.library.opcheck(torch.ops.wb.rope.default, (q, k, cos, sin, True, False, backend), test_utils=utils)
    torch.library.opcheck(torch.ops.wb.rope_.default, (q.detach().clone(), k.detach().clone(), cos, sin, False,
                                                       backend), test_utils=utils[:2])
