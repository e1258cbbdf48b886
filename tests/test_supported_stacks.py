"""What `make` installs on a GPU node is a torch release a stack has run (README.md, Supported stacks): the
Makefile pins it (GPU_TORCH), the pin lies in the supported range, and the README's stack table has a run of
that release. A bare `torch` there would take PyPI's newest, which no stack has run."""

from __future__ import annotations

import re

from gpu_workbench.parallel.runtime.compat import SUPPORTED_TORCH
from tests.helpers.cli import ROOT


def _makefile_var(name: str) -> str:
    return re.search(rf"^{name}\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)


def _stack_table_torch_releases() -> set[str]:
    """The torch releases (build tag dropped) of the README's Supported stacks rows that have counts (a run
    that ended; a row without one says `-`)."""
    section = (ROOT / "README.md").read_text().split("## Supported stacks", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0]]
    torch, counts = header.index("torch"), header.index("passed / failed / skipped")
    return {row[torch].strip().split("+")[0] for row in rows[2:] if row[counts].strip() != "-"}


def test_gpu_branch_of_make_installs_the_pinned_torch():
    gpu_torch = _makefile_var("GPU_TORCH")
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r"pip install -q (torch\S*)", makefile)
    assert "torch==$(GPU_TORCH)" in installs, f"the GPU branch of the Makefile installs {installs}"
    assert "torch" not in installs, "a bare `torch` install takes PyPI's newest release"
    minor = ".".join(gpu_torch.split(".")[:2])
    oldest, newest = (tuple(map(int, v.split("."))) for v in SUPPORTED_TORCH)
    assert oldest <= tuple(map(int, minor.split("."))) <= newest, f"GPU_TORCH {gpu_torch} outside {SUPPORTED_TORCH}"


def test_gpu_torch_is_a_release_a_stack_has_run():
    ran = _stack_table_torch_releases()
    assert ran, "README.md's Supported stacks table lists no run"
    assert _makefile_var("GPU_TORCH") in ran, f"GPU_TORCH {_makefile_var('GPU_TORCH')} is not among the runs {ran}"
