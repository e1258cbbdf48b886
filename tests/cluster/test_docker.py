"""The Dockerfiles (no docker engine here, so no build): every file they COPY exists, base images are
pinned, the GPU image has Nsight and installs DeepSpeed and Ray, and the README has the run flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.cluster.common import ROOT

DOCKER = ROOT / "docker"
FILES = ["Dockerfile", "Dockerfile.cpu"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", FILES)
def test_copied_files_exist(name):
    copies = [args for word, args in instructions(DOCKER / name) if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]   # drop --chown=..., --from=...
        for src in words[:-1]:
            assert list(ROOT.glob(src)), f"{name}: COPY source '{src}' does not exist in the build context"
    copied = {Path(w).name for args in copies for w in shlex.split(args)[:-1]}
    packages = re.search(r'include = \[([^\]]*)\]', (ROOT / "pyproject.toml").read_text()).group(1)
    for pkg in re.findall(r'"(\w+)\*"', packages):   # every package pyproject installs is in the image
        assert pkg in copied, f"{name} does not copy package {pkg}"


@pytest.mark.parametrize("name", FILES)
def test_base_images_are_pinned(name):
    bases = [args.split()[0] for word, args in instructions(DOCKER / name) if word == "FROM"]
    assert bases
    for image in bases:
        assert "$" not in image, f"{name}: base image from a build arg: {image}"
        assert "@sha256:" in image or re.search(r":[\w.-]*\d[\w.-]*$", image), f"{name}: unpinned base {image}"
        assert not image.endswith(":latest")


def test_gpu_image_has_nsight_deepspeed_ray():
    text = (DOCKER / "Dockerfile").read_text()
    assert "nvcr.io/nvidia/pytorch:" in text
    assert "nsys --version" in text and "ncu --version" in text
    assert "deepspeed" in text and "ray[default,train]" in text


def test_readme_has_run_flags_and_ray_example():
    text = (DOCKER / "README.md").read_text()
    for flag in ("--gpus all", "--ipc=host", "--ulimit memlock=-1", "--ulimit stack=67108864"):
        assert flag in text
    assert "ray start --head" in text and "ray start --block --address" in text and "RAY_AUTH_MODE=token" in text
