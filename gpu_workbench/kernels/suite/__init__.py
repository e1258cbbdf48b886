"""Correctness sweeps, benchmarks and compile specs of every kernel, as the CLI and scripts run them.

Each kernel registers one module here exposing:
    check(backend: str, seed: int) -> list[CheckRow]     # against a float64 reference
    bench(device: str, quick: bool) -> list[BenchRow]    # timings side by side in one run
    compile_specs() -> list[CompileSpec]                 # every config the launcher may compile
"""

from __future__ import annotations

import importlib

KERNELS = {
    "softmax": "gpu_workbench.kernels.suite.softmax",
    "quant_matmul": "gpu_workbench.kernels.suite.quant_matmul",
    "attention": "gpu_workbench.kernels.suite.attention",
    "doc_attention": "gpu_workbench.kernels.suite.doc_attention",
    "linear_cross_entropy": "gpu_workbench.kernels.suite.linear_cross_entropy",
    "rms_norm": "gpu_workbench.kernels.suite.rms_norm",
    "rope": "gpu_workbench.kernels.suite.rope",
    "swiglu": "gpu_workbench.kernels.suite.swiglu",
    "grouped_matmul": "gpu_workbench.kernels.suite.grouped_matmul",
}


def suite(name: str):
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose from {', '.join(KERNELS)} or 'all'")
    return importlib.import_module(KERNELS[name])


def names(selection: str) -> list[str]:
    if selection == "all":
        return list(KERNELS)
    suite(selection)  # validates the name
    return [selection]
