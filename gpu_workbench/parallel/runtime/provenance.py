"""What produced a run: the project's commit (and whether its tree was dirty), the versions of the stack,
the machine, and a digest of the resolved config. Recorded in every summary.json (`provenance`) and
printed by `wb report`, so a figure can always be traced back to the code and settings behind it.

Versions are read from the installed distributions' metadata, so nothing here imports DeepSpeed or Ray;
torch's, once torch is imported, from torch itself, with its build tag (parallel/runtime/compat.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# the distributions whose version changes a run's numbers or speed
STACK = ("torch", "triton", "deepspeed", "ray", "numpy")
SOURCE_ROOT = Path(__file__).resolve().parents[3]   # the checkout `gpu_workbench` was imported from


def collect(config: dict, device_name: str | None = None) -> dict:
    """The provenance record of a run whose resolved config is `config` (config.json without `segments`)."""
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": _dirty(),
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in STACK}},
        "machine": {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "device": device_name},
        "config_sha256": config_digest(config),
    }


def device_name(device) -> str:
    """A torch.device's model name: the GPU's, or the CPU's architecture (torch is imported by the caller)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}"


def config_digest(config: dict) -> str:
    """sha256 of the config's canonical JSON, without the fields that name where or how often it ran."""
    kept = {k: v for k, v in config.items() if k not in ("segments", "run_dir", "name")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _version(distribution: str) -> str | None:
    if distribution == "torch" and "torch" in sys.modules:   # `2.11.0+cu130`, not the metadata's `2.11.0`
        from gpu_workbench.parallel.runtime import compat

        return compat.torch_build_version()
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    """git's answer in the source checkout, or None where there is none (an installed wheel, no git)."""
    try:
        done = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _dirty() -> bool | None:
    """True when tracked files differ from the commit (untracked files do not change the code that ran)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)
