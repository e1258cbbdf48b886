"""Ahead-of-time compile of the Triton kernels for GPUs that are not present.

Triton compiles to PTX and cubin on a CPU machine, so CPU CI proves that every kernel, at every
autotune config it may pick, compiles for Ampere (sm_80) and Hopper (sm_90), and reports what the
cubin costs: registers, spills, shared memory, and the occupancy those allow. A row fails when the
compile fails, when it spills registers to local memory, when its shared memory is over the per-block
limit, when no block fits on an SM, or when an instruction the spec expects is absent from the PTX
(e.g. `wgmma` in a Hopper matmul). Version differences go through kernels/triton_compat.py.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gpu_workbench.kernels import jit_loader


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of one compute capability (CUDA programming guide, compute capabilities table)."""

    shared_per_sm: int
    shared_per_block: int  # the most dynamic shared memory one block may opt in to
    registers: int = 65_536
    max_warps: int = 64
    max_blocks: int = 32
    register_unit: int = 256  # registers are allocated per warp in units of 256
    reserved_shared: int = 1024  # the driver keeps 1 KB of shared memory per resident block


SM_LIMITS = {80: SmLimits(shared_per_sm=164 * 1024, shared_per_block=163 * 1024),  # A100
             90: SmLimits(shared_per_sm=228 * 1024, shared_per_block=227 * 1024)}  # H100 / H200
SHARED_MEMORY_LIMIT = {arch: limits.shared_per_block for arch, limits in SM_LIMITS.items()}
ARCHS = tuple(SM_LIMITS)

# Instructions worth knowing are in the PTX: tensor cores (Hopper's async wgmma, Ampere's mma.sync),
# Ampere's async global->shared copies, and Hopper's tensor-memory-accelerator bulk copies.
INSTRUCTIONS = {"wgmma": r"\bwgmma\.mma_async", "mma": r"\bmma\.sync", "cp.async": r"\bcp\.async\.c[ag]\b",
                "TMA": r"\bcp\.async\.bulk\.tensor"}


@dataclass(frozen=True)
class CompileSpec:
    """One kernel at one autotune config and dtype, as the launcher would launch it."""

    kernel: str  # source file in kernels/jit/
    fn: str  # @triton.jit function name in that file
    signature: dict  # argument -> Triton type ('*fp16', 'i32', 'constexpr', ...)
    constexprs: dict
    num_warps: int
    num_stages: int
    label: str
    # Substrings the PTX must contain for a given arch, e.g. {90: ("wgmma",)}.
    expect_ptx: dict = field(default_factory=dict)
    # Integer arguments the JIT would see divisible by 16 at run time (sizes, strides). Pointer
    # arguments always are (torch allocations are 256-byte aligned). The JIT specialises on this
    # divisibility, and with it loads become vectorised, pipelined async copies that use more shared
    # memory: compiling without it would under-report shared memory.
    aligned: tuple = ()
    # The archs the launcher may run this config on (it prunes the others, see e.g. kernels/quant_matmul.py).
    archs: tuple = (80, 90)


@dataclass
class CompileResult:
    spec: CompileSpec
    arch: int
    ok: bool
    error: str = ""
    shared_bytes: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None  # per thread; None when cuobjdump could not be run
    missing_ptx: tuple = ()
    instructions: tuple = ()  # names from INSTRUCTIONS found in the PTX
    warps_per_sm: int | None = None  # resident warps per SM that registers, shared memory and warps allow

    @property
    def failure(self) -> str:
        """Why this row fails, or '' when it passes."""
        if not self.ok:
            return self.error or "compile failed"
        if self.spill_bytes is None:
            return "spills unknown: cuobjdump could not read the cubin"
        if self.spill_bytes > 0:
            return f"spills {self.spill_bytes} B per thread to local memory"
        if self.shared_bytes > SHARED_MEMORY_LIMIT[self.arch]:
            return f"shared memory over the {SHARED_MEMORY_LIMIT[self.arch]} B limit"
        if not self.warps_per_sm:
            return "no block fits on one SM"
        if self.missing_ptx:
            return f"missing in PTX: {', '.join(self.missing_ptx)}"
        return ""

    @property
    def passed(self) -> bool:
        return not self.failure


def resident_warps(arch: int, num_warps: int, registers: int, shared: int) -> int:
    """Warps of this kernel resident on one SM at once (the CUDA occupancy calculator's rule)."""
    sm = SM_LIMITS[arch]
    unit = sm.register_unit
    regs_per_warp = -(-max(registers, 1) * 32 // unit) * unit
    by_registers = (sm.registers // regs_per_warp) // num_warps
    by_shared = sm.shared_per_sm // (shared + sm.reserved_shared) if shared <= sm.shared_per_block else 0
    by_warps = sm.max_warps // num_warps
    return min(by_registers, by_shared, by_warps, sm.max_blocks) * num_warps


def sweep_arch(capability: tuple[int, int]) -> int:
    """The swept arch whose limits a GPU of this compute capability is held to (Hopper and newer: 90)."""
    return 90 if capability[0] >= 9 else 80


def compile_spec(spec: CompileSpec, arch: int, dump_dir: Path | None = None) -> CompileResult:
    """Compile one spec for one arch; a compiler error becomes a failed row carrying its message."""
    from gpu_workbench.kernels import triton_compat as tc

    if arch not in SM_LIMITS:
        raise ValueError(f"arch={arch} is not supported; choose from {sorted(SM_LIMITS)}")
    fn = getattr(jit_loader.load(spec.kernel, interpret=False), spec.fn)
    aligned = [n for n, t in spec.signature.items() if t.startswith("*")] + list(spec.aligned)
    source = tc.ast_source(fn, spec.signature, spec.constexprs, aligned)
    try:
        compiled = tc.compile_for(source, arch, spec.num_warps, spec.num_stages)
    except Exception as err:  # the compiler's own message is the useful report
        return CompileResult(spec, arch, ok=False, error=tc.compiler_message(err))
    ptx = tc.intermediate(compiled, "ptx")
    registers, spills = resource_usage(tc.cubin(compiled))
    shared = tc.shared_bytes(compiled)
    if dump_dir is not None:
        dump_stages(compiled, Path(dump_dir) / f"sm{arch}" / dump_name(spec.label))
    return CompileResult(
        spec, arch, ok=True, shared_bytes=shared, registers=registers, spill_bytes=spills,
        missing_ptx=tuple(s for s in spec.expect_ptx.get(arch, ()) if s not in ptx),
        instructions=tuple(name for name, pattern in INSTRUCTIONS.items() if re.search(pattern, ptx)),
        warps_per_sm=resident_warps(arch, spec.num_warps, registers, shared) if registers else None)


def dump_name(label: str) -> str:
    """A file-system-safe directory name for a spec label."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")


def dump_stages(compiled, where: Path) -> None:
    """Write every stage of one compile: TTIR, TTGIR, LLIR, PTX and SASS, one file each."""
    from gpu_workbench.kernels import triton_compat as tc

    where.mkdir(parents=True, exist_ok=True)
    for stage in (*tc.IR_STAGES, "sass"):
        try:
            text = tc.intermediate(compiled, stage)
        except Exception as err:  # e.g. no disassembler: say so in the file rather than lose the rest
            text = f"could not produce {stage}: {err}\n"
        (where / f"kernel.{stage}").write_text(text)


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers and spill bytes per thread, read with Triton's bundled cuobjdump.

    Spilled registers land in the thread's stack frame: cuobjdump reports them under STACK (and
    LOCAL for other local arrays); a Triton kernel has no stack otherwise.
    """
    from gpu_workbench.kernels import triton_compat as tc

    tool = tc.bundled_tool("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                                 text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    if not regs:
        return None, None
    return int(regs.group(1)), sum(int(m.group(1)) for m in (stack, local) if m)


def triton_type(dtype) -> str:
    """Triton pointer type for a torch dtype, e.g. torch.float16 -> '*fp16'."""
    import torch

    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
             torch.int32: "i32", torch.uint8: "u8", torch.int64: "i64"}
    return "*" + names[dtype]


def _compile_job(job: tuple[CompileSpec, int, Path | None]) -> CompileResult:
    return compile_spec(*job)


def compile_all(specs: list[CompileSpec], archs=ARCHS, jobs: int | None = None,
                dump_dir: Path | None = None) -> list[CompileResult]:
    """Compile every spec for every arch it may run on, in `jobs` worker processes (default: one per CPU)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    work = [(spec, arch, dump_dir) for spec in specs for arch in archs if arch in spec.archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(work) < 4:
        return [_compile_job(job) for job in work]
    # spawn: workers must not inherit a CUDA context, and need no state of this process.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_job, work, chunksize=4))
