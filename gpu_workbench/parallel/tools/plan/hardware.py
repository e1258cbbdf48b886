"""A GPU's figures for the planner: dense bf16 FLOP/s, HBM bandwidth, and the bandwidth one GPU gets inside
its node and across nodes (one direction, bytes/s), and GPUs per node. Presets from the vendors' data sheets
(SXM parts, dense, no sparsity); a TOML or JSON file gives the same fields for other machines."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.toml_compat import tomllib


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_bf16_flops: float       # FLOP/s, dense
    hbm_gb_s: float              # GB/s
    intra_node_gb_s: float       # GB/s per GPU, one direction (NVLink)
    inter_node_gb_s: float       # GB/s per GPU, one direction (the GPU's NIC share)
    gpus_per_node: int = 8


PRESETS = {
    # H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, NVLink 4 900 GB/s both ways, 400 Gb/s NIC per GPU
    "H100": Hardware("H100", 989e12, 3350, 450, 50),
    # H200 SXM: the H100's compute, 4.8 TB/s HBM3e
    "H200": Hardware("H200", 989e12, 4800, 450, 50),
    # A100 SXM 80GB: 312 TFLOP/s bf16 dense, 2.0 TB/s, NVLink 3 600 GB/s both ways, 200 Gb/s NIC per GPU
    "A100": Hardware("A100", 312e12, 2039, 300, 25),
}
REQUIRED = [f.name for f in fields(Hardware) if f.name not in ("name", "gpus_per_node")]


def load(spec: str) -> Hardware:
    """A preset's name, or a .toml / .json file with the Hardware fields (`name` and `gpus_per_node` optional)."""
    if spec.upper() in PRESETS:
        return PRESETS[spec.upper()]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--hardware {spec}: neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"--hardware {spec}: cannot parse ({e})") from None
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise UserError(f"--hardware {spec}: missing field {missing[0]} (needs {', '.join(REQUIRED)})")
    unknown = sorted(set(raw) - {f.name for f in fields(Hardware)})
    if unknown:
        raise UserError(f"--hardware {spec}: unknown field {unknown[0]}")
    for key in REQUIRED:
        if not isinstance(raw[key], (int, float)) or raw[key] <= 0:
            raise UserError(f"--hardware {spec}: {key} must be a positive number, got {raw[key]!r}")
    return Hardware(**{"name": path.stem, **raw})
