"""Every difference between the Triton releases this project supports, in one module.

Supported: Triton 3.6 to 3.9 (pyproject.toml pins the range; `make test` runs the compile sweep and the
interpreter kernel tests under 3.6 as well as the main venv's 3.9). Nothing else in kernels/ may import
a private Triton name or branch on the Triton version: it calls a helper here. Each helper says which
release it bridges, and tests/kernels/test_triton_compat.py checks each against the installed Triton.

Kernel-source rules (inside @triton.jit code, where a Python helper cannot reach; the 3.6 lane of
`make test` compiles every kernel, so breaking one fails there):
  - an integer dot with an int32 accumulator passes `out_dtype=tl.int32`: 3.6 asserts the accumulator
    is the default out_dtype (fp32), 3.9 infers it from the accumulator.
"""

from __future__ import annotations

import inspect
import os
import traceback
from pathlib import Path

import triton
import triton.language as tl

OLDEST, NEWEST = (3, 6), (3, 9)  # the releases `make test` runs the kernels under

# Reductions through tl.reduce with Triton's own combine functions (3.6-3.9 both name them so). tl.max /
# tl.sum are @jit helpers compiled when triton is imported, which an interpreted kernel cannot call;
# the interpreter recognises these combine functions and reduces with NumPy.
MAX_COMBINE = tl.standard._elementwise_max
SUM_COMBINE = tl.standard._sum_combine


def version() -> tuple[int, int]:
    """(major, minor) of the installed Triton, e.g. (3, 6)."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def set_default_fp_fusion() -> None:
    """Triton 3.9 warns on every compile unless TRITON_DEFAULT_FP_FUSION is set (3.6 neither reads nor
    warns); set it to 3.9's own default, fusion on, so the numbers do not change."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def fix_interpreter_scalar_index() -> None:
    """Let the interpreter use a scalar tensor as a Python int (a `range` bound, an index) on Triton 3.6.

    3.6's interpreter converts with `int(array)`, and its scalar ops (tl.maximum of two scalars, say)
    give 1-element 1-d arrays, which NumPy 2.4 refuses to convert ("only 0-dimensional arrays can be
    converted to Python scalars"). 3.9 squeezes the array first; this installs the same rule on a
    release without it, wrapping the function that 3.6 calls to patch tensors on every interpreted launch.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_scalars", False):
        return
    if "squeeze" in inspect.getsource(original):  # 3.9 and later do it themselves
        original.squeezes_scalars = True
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_scalars = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def ast_source(fn, signature: dict, constexprs: dict, aligned_args: list[str]):
    """A compile source for `fn`. `aligned_args`: arguments the JIT would see divisible by 16.

    Since 3.3 (so in 3.6 and 3.9) attrs map an argument's index path to MLIR attributes; before that
    they were an AttrsDescriptor object, which this project no longer supports.
    """
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned_args}
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def compile_for(source, arch: int, num_warps: int, num_stages: int):
    """Compile for an NVIDIA GPU of compute capability `arch` (80, 90) that need not be present.
    GPUTarget lives in triton.backends.compiler in 3.6-3.9; warp size 32."""
    from triton.backends.compiler import GPUTarget

    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def shared_bytes(compiled) -> int:
    """Dynamic shared memory the kernel launches with (`metadata.shared` in 3.6-3.9)."""
    return int(compiled.metadata.shared)


IR_STAGES = ("ttir", "ttgir", "llir", "ptx")  # text stages in `compiled.asm`, same keys in 3.6-3.9


def intermediate(compiled, stage: str) -> str:
    """One text stage of the pipeline: ttir, ttgir, llir, ptx, or sass (disassembled from the cubin on
    first access by the bundled cuobjdump: `compiled.asm` is an AsmDict in 3.6-3.9)."""
    return compiled.asm[stage]


def cubin(compiled) -> bytes:
    return compiled.asm["cubin"]


def bundled_tool(name: str) -> Path | None:
    """A CUDA binary Triton ships (cuobjdump, nvdisasm, ptxas): backends/nvidia/bin in 3.6-3.9."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.is_file() else None


def compiler_message(err: BaseException, max_lines: int = 3) -> str:
    """The compiler's own words for a failed compile, without the source excerpt and caret.

    A front-end error is a CompilationError (3.6-3.9) whose `error_message` is the message and `src`
    / `node` the offending line; an error inside a helper the kernel calls is a CompilationError whose
    cause is another one, so the innermost is reported. Back-end errors (MLIR passes, ptxas) are plain
    exceptions whose text is the message.
    """
    from triton.compiler.errors import CompilationError

    inner = err
    while isinstance(inner.__cause__, CompilationError):
        inner = inner.__cause__
    if isinstance(inner, CompilationError) and getattr(inner, "error_message", None):
        where = _source_line(inner)
        return f"{inner.error_message}{f' (at: {where})' if where else ''}"
    where = _source_line(inner) if isinstance(inner, CompilationError) else ""
    if isinstance(inner, CompilationError) and inner.__cause__ is not None:
        inner = inner.__cause__
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip() and set(ln.strip()) != {"^"}]
    # A bare `assert` inside Triton has no text: its source line in Triton is the message.
    text = " | ".join(lines[:max_lines]) or _raising_line(inner)
    message = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    return f"{message} (at: {where})" if where else message


def _raising_line(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno}: {(last.line or '').strip()}"


def _source_line(err) -> str:
    node, src = getattr(err, "node", None), getattr(err, "src", None)
    lineno = getattr(node, "lineno", None)
    if not src or not lineno:
        return ""
    lines = src.splitlines()
    return lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
