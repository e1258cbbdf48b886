"""The Dockerfiles and docker/README.md, checked without a docker engine (the suite's box has the client
but no daemon, so nothing is built): every file they COPY exists, base images are pinned, every RUN is
valid shell, the images install what pyproject.toml declares (the CPU image torch at the Makefile's
pin), the build's import check names real packages, the GPU build runs the Nsight tools `wb profile`
launches, CMD runs a declared entry point, and every command in the README is valid shell whose `wb`
invocations parse against the real CLI."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from gpu_workbench.parallel.runtime.toml_compat import tomllib
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


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGES = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
# The GPU image keeps the base image's CUDA builds of torch and triton (`pip install --no-deps`, see its
# comment). numpy is not in its explicit list either: it comes with the base image's torch, so nothing in
# the build checks the declared numpy>=1.26 (adding it to the Dockerfile's list would).
FROM_GPU_BASE = {"torch", "triton", "numpy"}
NOT_IN_IMAGES = {"ruff"}   # the test extra's linter: `make lint`, not needed to run anything in an image
GPU_IMAGE_PYTHON = "3.12"   # nvcr.io/nvidia/pytorch:25.01-py3's: a dependency marked for older Pythons is not its


def _runs(name: str) -> list[str]:
    return [args for word, args in instructions(DOCKER / name) if word == "RUN"]


def _commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line's `a && b && c` chain, as words."""
    return [shlex.split(part) for part in run.split("&&")]


def _pip_installs(name: str) -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN lines, options dropped."""
    out = []
    for run in _runs(name):
        for words in _commands(run):
            if words[:2] == ["pip", "install"]:
                out.append([w for w in words[2:] if not w.startswith("-") and w != "."
                            and not w.startswith("https://")])
    return out


def _declared(extra: str | None = None) -> dict[str, Requirement]:
    reqs = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return {r.name: r for r in map(Requirement, reqs)}


def _satisfies(image: Requirement, declared: Requirement) -> bool:
    """The image asks for the same extras and either the same range or a pin inside the declared one."""
    if image.extras != declared.extras:
        return False
    if str(image.specifier) == str(declared.specifier):
        return True
    pins = [s.version for s in image.specifier if s.operator == "=="]
    return len(pins) == 1 and declared.specifier.contains(pins[0], prereleases=True)


@pytest.mark.parametrize("name", FILES)
def test_run_lines_are_valid_shell(name):
    runs = _runs(name)
    assert runs
    for run in runs:   # shell form: /bin/sh -c, dash in both bases (Debian / Ubuntu); bash for good measure
        for shell in ("sh", "bash"):
            done = subprocess.run([shell, "-n", "-c", run], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, f"{name}: {shell} -n rejects RUN {run!r}: {done.stderr}"


def test_gpu_image_installs_the_declared_dependencies():
    """`pip install --no-deps -e .` installs none of the dependencies: the explicit list after it must
    name every one pyproject declares (and the test extra), within the declared versions."""
    pips = [words for run in _runs("Dockerfile") for words in _commands(run) if words[:2] == ["pip", "install"]]
    assert ["pip", "install", "--no-deps", "-e", "."] in pips   # the project itself, no dependency resolution
    installs = _pip_installs("Dockerfile")
    listed = {r.name: r for args in installs for r in map(Requirement, args)}
    wanted = {**_declared(), **_declared("test")}
    for name, declared in wanted.items():
        if name in FROM_GPU_BASE | NOT_IN_IMAGES or (
                declared.marker and not declared.marker.evaluate({"python_version": GPU_IMAGE_PYTHON})):
            continue
        assert name in listed, f"Dockerfile does not install {declared} (pyproject.toml declares it)"
        assert _satisfies(listed[name], declared), f"Dockerfile installs {listed[name]}, pyproject declares {declared}"
    assert not set(listed) - set(wanted), f"Dockerfile installs undeclared {set(listed) - set(wanted)}"


def test_cpu_image_installs_the_project_with_its_test_extra_and_the_makefile_torch():
    installs = _pip_installs("Dockerfile.cpu")
    projects = [a for args in installs for a in args if a.startswith(".[")]
    assert projects, "Dockerfile.cpu does not pip install the project"
    for spec in projects:
        extras = Requirement("gpu-workbench" + spec[1:]).extras
        assert "test" in extras and extras <= set(PROJECT["optional-dependencies"]), f"extras in {spec}"
    torch_reqs = [r for args in installs for r in map(Requirement, (a for a in args if not a.startswith(".")))
                  if r.name == "torch"]
    assert len(torch_reqs) == 1, torch_reqs
    torch_req = torch_reqs[0]
    makefile_pin = re.search(r"^CPU_TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert str(torch_req.specifier) == f"=={makefile_pin}", f"CPU image {torch_req} vs Makefile {makefile_pin}"
    assert _satisfies(torch_req, _declared()["torch"])


def test_gpu_build_imports_real_packages_and_checks_the_nsight_tools():
    from gpu_workbench.profiling import nsight

    commands = [words for run in _runs("Dockerfile") for words in _commands(run)]
    imports = [w for words in commands if words[:2] == ["python", "-c"]
               for w in re.findall(r"import (.*)", words[2])[0].replace(" ", "").split(",")]
    assert imports
    dependencies = set(_declared())
    for module in imports:
        if module in dependencies:
            continue
        top = module.split(".")[0]
        assert top in PACKAGES and (ROOT / module.replace(".", "/") / "__init__.py").is_file(), \
            f"the build imports {module!r}: neither a package of this project nor a declared dependency"
    # the tools `wb profile nsys|ncu` runs must exist in the image: the build fails if the base lacks them
    for tool in (nsight.nsys_prefix("x")[0], nsight.ncu_prefix("x", "fwd")[0]):
        assert [tool, "--version"] in commands, f"the GPU build does not check for {tool}"


@pytest.mark.parametrize("name", FILES)
def test_cmd_runs_a_declared_entry_point(name):
    (cmd,) = [args for word, args in instructions(DOCKER / name) if word == "CMD"]
    argv = json.loads(cmd)   # exec form
    if argv[0] == "python":
        assert argv[1] == "-m" and (argv[2] in PACKAGES or argv[2] in _declared("test")), argv
        if argv[2] == "pytest":
            assert all((ROOT / a).exists() for a in argv[3:] if not a.startswith("-")), argv
    else:
        assert argv[0] in PROJECT["scripts"], f"{name}: CMD {argv} is not a [project.scripts] entry"


# ---- docker/README.md ----------------------------------------------------------------------------------
README = DOCKER / "README.md"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def _readme_commands() -> list[list[str]]:
    """Each command line of the README's bash blocks, continuations joined, comments dropped, as words."""
    out = []
    for block in _bash_blocks():
        for line in re.sub(r"\\\n", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def test_readme_bash_blocks_are_valid_shell():
    blocks = _bash_blocks()
    assert len(blocks) >= 4
    for block in blocks:
        done = subprocess.run(["bash", "-n", "-c", block], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"bash -n rejects:\n{block}\n{done.stderr}"


def test_readme_docker_commands_use_the_built_images_with_the_gpu_flags():
    commands = _readme_commands()
    built = {}
    for words in commands:
        if words[:2] == ["docker", "build"]:
            dockerfile, tag = words[words.index("-f") + 1], words[words.index("-t") + 1]
            assert (ROOT / dockerfile).is_file(), f"docker build -f {dockerfile}: no such file"
            built[tag] = dockerfile
    runs = [words for words in commands if words[:2] == ["docker", "run"]]
    assert built and runs
    for words in runs:
        images = [w for w in words if w in built]
        assert len(images) == 1, f"docker run without an image built above: {shlex.join(words)}"
        options = shlex.join(words[:words.index(images[0])])
        if "--gpus" in options:   # what the README's flag list says NCCL, pinned memory and NVIDIA need
            for flag in ("--ipc=host", "--ulimit memlock=-1", "--ulimit stack=67108864"):
                assert flag in options, f"GPU docker run without {flag}: {shlex.join(words)}"


def _wb_invocations(words: list[str]) -> list[list[str]]:
    """`wb ...` argument lists in a README command: the command itself, or a container's command."""
    while words and re.fullmatch(r"\w+=.*", words[0]):   # VAR=value prefixes
        words = words[1:]
    if words[:1] == ["wb"]:
        return [words[1:]]
    if words[:2] == ["docker", "run"]:
        image = next(i for i, w in enumerate(words) if w.startswith("gpu-workbench:"))
        return _wb_invocations(words[image + 1:])
    return []


def _parse_wb(args: list[str]) -> None:
    """Parse `wb args` with the real CLI's commands and options (nothing runs), and any `wb` command
    given after `--` (wb profile / launch / ray submit run one) the same way."""
    import typer.main

    from gpu_workbench.cli.app import app

    cmd, path = typer.main.get_command(app), ["wb"]
    while hasattr(cmd, "commands"):
        assert args and args[0] in cmd.commands, f"{' '.join(path)}: no command {args[:1]}"
        path.append(args[0])
        cmd, args = cmd.commands[args[0]], args[1:]
    ctx = cmd.make_context(" ".join(path), list(args))
    for value in ctx.params.values():
        if isinstance(value, list | tuple) and value[:1] == ["wb"]:
            _parse_wb(list(value[1:]))


def test_readme_wb_commands_parse():
    invocations = [args for words in _readme_commands() for args in _wb_invocations(words)]
    assert len(invocations) >= 4
    for args in invocations:
        try:
            _parse_wb(args)
        except Exception as error:
            pytest.fail(f"`wb {shlex.join(args)}` from docker/README.md does not parse: {error}")
