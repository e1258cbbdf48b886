"""Every kernel, at every autotune config and dtype it may launch, compiles for Hopper and Ampere.

Triton compiles for a GPU that is absent, so this runs on a CPU machine. It checks what the
interpreter cannot: that each config fits the shared-memory limit (compiled with the alignment the
JIT specialises on, so loads are pipelined as on the GPU), and that the PTX holds the instructions
expected (each kernel's specs name them, e.g. `wgmma` for Hopper matmuls).

A row fails on a compile error, on any register spill, on shared memory over the per-block limit, when
no block fits on an SM, or on a missing instruction (kernels/aot.py).

Time budget: every config of every kernel for sm_90 (the wgmma and shared-memory checks that matter
most), and every softmax config for sm_80 too. The attention and quant tests compile representative
configs for sm_80; `wb kernels compile all` compiles everything for both (BENCHMARKS.md has the counts).
"""

from __future__ import annotations

import pytest

from gpu_workbench.kernels import suite
from gpu_workbench.kernels.aot import (
    SHARED_MEMORY_LIMIT,
    CompileResult,
    CompileSpec,
    compile_all,
    compile_spec,
    resident_warps,
)

SWEEPS = [(kernel, 90) for kernel in suite.KERNELS] + [("softmax", 80)]


@pytest.mark.slow
@pytest.mark.parametrize("kernel,arch", SWEEPS, ids=[f"{k}-sm{a}" for k, a in SWEEPS])
def test_every_config_compiles(kernel, arch):
    specs = suite.suite(kernel).compile_specs()
    assert specs, f"{kernel} declares no compile specs"
    # in this process: under xdist every CPU is busy already, and a spawned pool re-imports torch and triton
    results = compile_all(specs, (arch,), jobs=1)
    assert len(results) == len(specs)
    failures = [f"{r.spec.label} sm_{r.arch}: {r.failure}" for r in results if not r.passed]
    assert not failures, "\n".join(failures[:20])
    for r in results:
        assert r.shared_bytes <= SHARED_MEMORY_LIMIT[r.arch]
        assert r.registers is not None and r.registers <= 255
        assert r.spill_bytes == 0 and r.warps_per_sm >= r.spec.num_warps


def _fp32_block_spec(block_n: int, num_warps: int, label: str) -> CompileSpec:
    """The fp32 single-block softmax forward, one row per program, at a chosen width."""
    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "x_row_stride": "i32",
                 "y_row_stride": "i32", "LOG": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    return CompileSpec("softmax", "softmax_fwd_block", signature, {"LOG": False, "BLOCK_M": 1, "BLOCK_N": block_n},
                       num_warps, 1, label)


def test_a_broken_kernel_is_reported_not_raised():
    """The helper turns a compiler error into a failed row carrying the compiler's own message (so
    `wb kernels compile` can print it), not the source excerpt and caret."""
    spec = _fp32_block_spec(block_n=1000, num_warps=4, label="non-power-of-two block")
    result = compile_spec(spec, 90)
    assert not result.ok and not result.passed
    assert "must be a power of 2" in result.error and "^" not in result.error
    assert result.failure == result.error


def test_missing_ptx_instruction_fails_the_row():
    spec = CompileSpec("softmax", "softmax_fwd_looped", {"x_ptr": "*fp16", "y_ptr": "*fp16", "n_cols": "i32",
                       "x_row_stride": "i32", "y_row_stride": "i32", "LOG": "constexpr", "BLOCK_N": "constexpr"},
                       {"LOG": True, "BLOCK_N": 1024}, 4, 2, "softmax has no matmul", expect_ptx={90: ("wgmma",)})
    result = compile_spec(spec, 90)
    assert result.ok and result.missing_ptx == ("wgmma",) and not result.passed
    assert compile_spec(spec, 80).passed  # nothing expected on sm_80


def test_a_register_hungry_spec_fails_as_spilling():
    """A row of 8192 fp32 values held in registers by one warp (256 per thread) must spill, and a
    spilling row must fail, on both archs; the same row over 16 warps (16 per thread) must pass."""
    hungry = _fp32_block_spec(block_n=8192, num_warps=1, label="8k columns in one warp")
    for arch in (80, 90):
        result = compile_spec(hungry, arch)
        assert result.ok and result.spill_bytes > 0 and result.registers == 255
        assert not result.passed and "spills" in result.failure
    roomy = _fp32_block_spec(block_n=8192, num_warps=16, label="8k columns in 16 warps")
    result = compile_spec(roomy, 90)
    assert result.passed and result.spill_bytes == 0, result.failure


def test_dump_writes_every_stage(tmp_path):
    spec = _fp32_block_spec(block_n=1024, num_warps=4, label="softmax 1k / w4")
    result = compile_spec(spec, 80, dump_dir=tmp_path)
    assert result.passed, result.failure
    where = tmp_path / "sm80" / "softmax_1k_w4"
    for stage in ("ttir", "ttgir", "llir", "ptx", "sass"):
        assert (where / f"kernel.{stage}").read_text().strip(), stage
    assert "softmax_fwd_block" in (where / "kernel.sass").read_text()


def test_a_spec_compiles_only_for_the_archs_it_runs_on():
    spec = CompileSpec("softmax", "softmax_fwd_block", _fp32_block_spec(256, 4, "").signature,
                       {"LOG": False, "BLOCK_M": 1, "BLOCK_N": 256}, 4, 1, "hopper only", archs=(90,))
    results = compile_all([spec], archs=(80, 90), jobs=1)
    assert [r.arch for r in results] == [90]


def test_resident_warps_follow_the_occupancy_rules():
    # sm_80, 8 warps: 128 registers -> 4096 per warp -> 16 warps by registers; 48 KB (+1 KB) -> 3 blocks.
    assert resident_warps(80, 8, 128, 48 * 1024) == 16
    # 255 registers round up to 256 per thread: 8 warps by registers, one 8-warp block.
    assert resident_warps(90, 8, 255, 0) == 8
    # Shared memory decides: 100 KB per block leaves room for one block on sm_80, two on sm_90.
    assert resident_warps(80, 4, 32, 100 * 1024) == 4 and resident_warps(90, 4, 32, 100 * 1024) == 8
    # The 64-warp cap: 32 registers, 16-warp blocks, no shared memory.
    assert resident_warps(90, 16, 32, 0) == 64
    # Over the per-block limit: nothing is resident.
    assert resident_warps(90, 4, 32, SHARED_MEMORY_LIMIT[90] + 1) == 0


def _result(**fields) -> CompileResult:
    spec = _fp32_block_spec(256, 4, "made up")
    base = {"ok": True, "shared_bytes": 1024, "registers": 40, "spill_bytes": 0, "warps_per_sm": 48}
    return CompileResult(spec, 90, **{**base, **fields})


def test_every_failure_reason_fails_the_row_and_shows_red_in_the_table():
    from gpu_workbench.cli.kernels_cli import compile_table

    rows = [_result(), _result(spill_bytes=24), _result(spill_bytes=None),
            _result(shared_bytes=SHARED_MEMORY_LIMIT[90] + 4), _result(warps_per_sm=0),
            _result(missing_ptx=("wgmma",)), _result(ok=False, error="ValueError: bad block")]
    reasons = [r.failure for r in rows]
    assert reasons[0] == "" and rows[0].passed
    assert all(reason and not r.passed for reason, r in zip(reasons[1:], rows[1:], strict=True))
    assert "spills 24 B" in reasons[1] and "spills unknown" in reasons[2] and "shared memory" in reasons[3]
    table = compile_table(rows)
    assert [row.style for row in table.rows] == [None] + ["red"] * 6
    notes = table.columns[-1]._cells
    assert notes[1] == reasons[1] and notes[6] == "ValueError: bad block"
