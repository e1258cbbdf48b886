"""Every kernel, at every autotune config and dtype it may launch, compiles for Hopper and Ampere.

Triton compiles for a GPU that is absent, so this runs on a CPU machine. It checks what the
interpreter cannot: that each config fits the shared-memory limit (compiled with the alignment the
JIT specialises on, so loads are pipelined as on the GPU), and that the PTX holds the instructions
expected (each kernel's specs name them, e.g. `wgmma` for Hopper matmuls).

Time budget: every config of every kernel for sm_90 (the wgmma and shared-memory checks that matter
most), and every softmax config for sm_80 too. The attention and quant tests compile representative
configs for sm_80; `wb kernels compile all` compiles everything for both.
"""

from __future__ import annotations

import pytest

from kernels import suite
from kernels.aot import SHARED_MEMORY_LIMIT, CompileSpec, compile_all, compile_spec

SWEEPS = [(kernel, 90) for kernel in suite.KERNELS] + [("softmax", 80)]


@pytest.mark.slow
@pytest.mark.parametrize("kernel,arch", SWEEPS, ids=[f"{k}-sm{a}" for k, a in SWEEPS])
def test_every_config_compiles(kernel, arch):
    specs = suite.suite(kernel).compile_specs()
    assert specs, f"{kernel} declares no compile specs"
    results = compile_all(specs, (arch,), jobs=2)
    assert len(results) == len(specs)
    failures = [f"{r.spec.label} sm_{r.arch}: {r.error or r.missing_ptx or r.shared_bytes}"
                for r in results if not r.passed]
    assert not failures, "\n".join(failures[:20])
    for r in results:
        assert r.shared_bytes <= SHARED_MEMORY_LIMIT[r.arch]
        assert r.registers is not None and r.registers <= 255


def _fp32_block_spec(block_n: int, num_warps: int, label: str) -> CompileSpec:
    """The fp32 single-block softmax forward, one row per program, at a chosen width."""
    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "x_row_stride": "i32",
                 "y_row_stride": "i32", "LOG": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    return CompileSpec("softmax", "softmax_fwd_block", signature, {"LOG": False, "BLOCK_M": 1, "BLOCK_N": block_n},
                       num_warps, 1, label)


def test_a_broken_kernel_is_reported_not_raised():
    """The helper turns a compiler error into a failed row (so `wb kernels compile` can print it)."""
    spec = _fp32_block_spec(block_n=1000, num_warps=4, label="non-power-of-two block")
    result = compile_spec(spec, 90)
    assert not result.ok and not result.passed and result.error


def test_missing_ptx_instruction_fails_the_row():
    spec = CompileSpec("softmax", "softmax_fwd_looped", {"x_ptr": "*fp16", "y_ptr": "*fp16", "n_cols": "i32",
                       "x_row_stride": "i32", "y_row_stride": "i32", "LOG": "constexpr", "BLOCK_N": "constexpr"},
                       {"LOG": True, "BLOCK_N": 1024}, 4, 2, "softmax has no matmul", expect_ptx={90: ("wgmma",)})
    result = compile_spec(spec, 90)
    assert result.ok and result.missing_ptx == ("wgmma",) and not result.passed
    assert compile_spec(spec, 80).passed  # nothing expected on sm_80


def test_register_spills_are_reported():
    """A row held whole in registers by too few threads spills; the report must show it."""
    spec = _fp32_block_spec(block_n=8192, num_warps=1, label="8k columns in one warp")
    result = compile_spec(spec, 90)
    assert result.ok and result.spill_bytes > 0
