"""Ahead-of-time compile of the Triton kernels for GPUs that are not present.

`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cap, 32))` runs the
whole pipeline to PTX and cubin on a CPU machine, so CPU CI proves that every kernel, at every
autotune config it may pick, compiles for Ampere (sm_80) and Hopper (sm_90) within the shared-memory
limit, and emits the instructions expected (e.g. `wgmma` in Hopper PTX for matmul-like kernels).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kernels import jit_loader

# Largest dynamic shared memory per block (bytes): A100 and H100/H200.
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
ARCHS = (80, 90)


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


@dataclass
class CompileResult:
    spec: CompileSpec
    arch: int
    ok: bool
    error: str = ""
    shared_bytes: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    missing_ptx: tuple = ()

    @property
    def passed(self) -> bool:
        return self.ok and not self.missing_ptx and (self.shared_bytes or 0) <= SHARED_MEMORY_LIMIT[self.arch]


def compile_spec(spec: CompileSpec, arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if arch not in SHARED_MEMORY_LIMIT:
        raise ValueError(f"arch={arch} is not supported; choose from {sorted(SHARED_MEMORY_LIMIT)}")
    fn = getattr(jit_loader.load(spec.kernel, interpret=False), spec.fn)
    names = list(spec.signature)
    aligned = [n for n, t in spec.signature.items() if t.startswith("*")] + list(spec.aligned)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    source = ASTSource(fn, spec.signature, constexprs=spec.constexprs, attrs=attrs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as err:  # the compiler's own message is the useful report
        message = str(err).strip().splitlines()
        return CompileResult(spec, arch, ok=False, error=(message[-1] if message else type(err).__name__))
    ptx = compiled.asm["ptx"]
    missing = tuple(s for s in spec.expect_ptx.get(arch, ()) if s not in ptx)
    registers, spills = _resource_usage(compiled.asm["cubin"])
    return CompileResult(spec, arch, ok=True, shared_bytes=compiled.metadata.shared,
                         registers=registers, spill_bytes=spills, missing_ptx=missing)


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers and spill bytes per thread, read with Triton's bundled cuobjdump.

    Spilled registers land in the thread's stack frame: cuobjdump reports them under STACK (and
    LOCAL for other local arrays); a Triton kernel has no stack otherwise.
    """
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
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


def _compile_job(job: tuple[CompileSpec, int]) -> CompileResult:
    return compile_spec(*job)


def compile_all(specs: list[CompileSpec], archs=ARCHS, jobs: int | None = None) -> list[CompileResult]:
    """Compile every spec for every arch, in `jobs` worker processes (default: one per CPU)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    work = [(spec, arch) for spec in specs for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(work) < 4:
        return [_compile_job(job) for job in work]
    # spawn: workers must not inherit a CUDA context, and need no state of this process.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_job, work, chunksize=4))
