"""SwiGLU forward and backward (Triton source only): y = silu(gate) * up, elementwise.

The launcher in kernels/swiglu.py passes flat contiguous tensors. All arithmetic is fp32 whatever the
storage dtype. The backward recomputes silu from gate rather than reading a saved y.
"""

import triton
import triton.language as tl


@triton.jit
def swiglu_fwd(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))  # tl.sigmoid is a @jit helper the interpreter cannot call
    tl.store(y_ptr + offs, (g * sig * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    tl.store(du_ptr + offs, (dy * silu).to(du_ptr.dtype.element_ty), mask=mask)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
