"""Load the `@triton.jit` kernel sources in `kernels/jit/`, compiled or interpreted.

Triton decides compiled-vs-interpreted when a function is *decorated* (it reads TRITON_INTERPRET
then), and an interpreted kernel cannot call a compiled helper. So each kernel file is executed as
its own module object per flavour: `load("softmax", interpret=True)` gives a module whose kernels
(and the helpers they call, which live in the same file) are all `InterpretedFunction`s;
`interpret=False` gives `JITFunction`s. Both flavours can coexist in one process: the interpreter
backend works on a GPU machine and the ahead-of-time compile check works on a CPU machine. The
variable is set only while a file executes, so the rest of the process is untouched.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from types import ModuleType

from gpu_workbench.kernels import triton_compat

JIT_DIR = Path(__file__).with_name("jit")
_cache: dict[tuple[str, bool], ModuleType] = {}
_lock = threading.Lock()

triton_compat.set_default_fp_fusion()  # before any kernel compiles


def load(name: str, interpret: bool) -> ModuleType:
    """Return the kernels of `kernels/jit/<name>.py`, interpreted or compiled, loaded once."""
    key = (name, interpret)
    with _lock:
        if key not in _cache:
            _cache[key] = _exec_with_flavour(name, interpret)
        return _cache[key]


def _exec_with_flavour(name: str, interpret: bool) -> ModuleType:
    path = JIT_DIR / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"no kernel source named {name!r} in {JIT_DIR}")
    module_name = f"gpu_workbench.kernels.jit.{name}__{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    if interpret:
        triton_compat.fix_interpreter_scalar_index()
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def kernels_for(name: str, backend: str) -> ModuleType:
    """The kernel module for a concrete backend ('triton' or 'interpret')."""
    if backend not in ("triton", "interpret"):
        raise ValueError(f"backend={backend!r} has no Triton kernels")
    return load(name, interpret=backend == "interpret")
