"""Every kernel, at every autotune config and dtype it may launch, compiles for sm_80 and sm_90.

Triton compiles for a GPU that is absent, so this runs on a CPU machine. It checks what the
interpreter cannot: that each config fits the shared-memory limit, and that the PTX holds the
instructions expected (each kernel's specs name them, e.g. `wgmma` for Hopper matmuls).
"""

from __future__ import annotations

import pytest

from kernels import suite
from kernels.aot import ARCHS, SHARED_MEMORY_LIMIT, CompileSpec, compile_all, compile_spec


@pytest.mark.slow
@pytest.mark.parametrize("kernel", list(suite.KERNELS))
def test_every_config_compiles_for_ampere_and_hopper(kernel):
    specs = suite.suite(kernel).compile_specs()
    assert specs, f"{kernel} declares no compile specs"
    results = compile_all(specs, ARCHS, jobs=2)
    assert len(results) == len(specs) * len(ARCHS)
    failures = [f"{r.spec.label} sm_{r.arch}: {r.error or r.missing_ptx or r.shared_bytes}"
                for r in results if not r.passed]
    assert not failures, "\n".join(failures[:20])
    for r in results:
        assert r.shared_bytes <= SHARED_MEMORY_LIMIT[r.arch]


def test_a_broken_kernel_is_reported_not_raised():
    """The helper turns a compiler error into a failed row (so `wb kernels compile` can print it)."""
    spec = CompileSpec("softmax", "softmax_fwd_block", {"x_ptr": "*fp32", "y_ptr": "*fp32", "n_rows": "i32",
                       "n_cols": "i32", "x_row_stride": "i32", "y_row_stride": "i32", "LOG": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                       {"LOG": False, "BLOCK_M": 1, "BLOCK_N": 1000}, 4, 1, "non-power-of-two block")
    result = compile_spec(spec, 90)
    assert not result.ok and not result.passed and result.error


def test_missing_ptx_instruction_fails_the_row():
    spec = CompileSpec("softmax", "softmax_fwd_looped", {"x_ptr": "*fp16", "y_ptr": "*fp16", "n_cols": "i32",
                       "x_row_stride": "i32", "y_row_stride": "i32", "LOG": "constexpr", "BLOCK_N": "constexpr"},
                       {"LOG": True, "BLOCK_N": 1024}, 4, 2, "softmax has no matmul", expect_ptx={90: ("wgmma",)})
    result = compile_spec(spec, 90)
    assert result.ok and result.missing_ptx == ("wgmma",) and not result.passed
    assert compile_spec(spec, 80).passed  # nothing expected on sm_80
