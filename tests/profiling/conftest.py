"""A real NVTX tool for the tests: tests/profiling/nvtx_recorder.c built into a shared library."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# The GPU image has no `nvtx` package (README.md, Supported stacks): the project then emits no NVTX ranges
# (profiling/ranges.py), and a test that looks for them in an attached tool's log skips with this reason.
NO_NVTX = "the nvtx package is not installed: no NVTX ranges are emitted (profiling/ranges.py)"


def _nvtx_include_dir(tmp: Path) -> Path:
    """The NVTX v3 headers: from the CUDA toolkit if installed, else from the nvtx source package."""
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    for root in roots:
        if root and (Path(root) / "include" / "nvtx3" / "nvToolsExt.h").exists():
            return Path(root) / "include"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "-d", str(tmp), "nvtx"], check=True, timeout=300)
    with tarfile.open(next(tmp.glob("nvtx-*.tar.gz"))) as sdist:
        sdist.extractall(tmp, filter="data")
    header = next(tmp.glob("nvtx-*/**/nvtx3/nvToolsExt.h"))
    return header.parent.parent


@pytest.fixture(scope="session")
def nvtx_recorder(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("nvtx")
    lib = build / "libnvtx_recorder.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", f"-I{_nvtx_include_dir(build)}", "-o", str(lib),
                    str(HERE / "nvtx_recorder.c")], check=True, timeout=120)
    return lib


def read_nvtx_logs(prefix: Path) -> dict[int, list[str]]:
    """Events per process id, as the recorder wrote them."""
    return {int(p.suffix[1:]): p.read_text().splitlines() for p in prefix.parent.glob(prefix.name + ".*")}


def nesting(events: list[str], domain: str = "wb") -> list[tuple[int, str, int]]:
    """(depth, message, payload) for each push of `domain`, checking pushes and pops balance."""
    depth, out = 0, []
    for line in events:
        kind, dom, *rest = line.split()
        if dom != domain:
            continue
        if kind == "push":
            out.append((depth, rest[0], int(rest[1])))
            depth += 1
        elif kind == "pop":
            depth -= 1
            assert depth >= 0, "pop without push"
    assert depth == 0, "unbalanced NVTX ranges"
    return out
