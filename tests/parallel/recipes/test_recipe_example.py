"""The architecture document's "Adding a recipe" example is real: its code, registered as the document
says, trains, and computes what `fsdp` with the same setting computes."""

from __future__ import annotations

import re
import sys

import pytest
import torch.distributed as dist

from gpu_workbench.parallel import RunConfig, train
from gpu_workbench.parallel.recipes import RECIPES
from tests.helpers.runs import ROOT, TINY, losses

DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _example() -> tuple[str, str, str]:
    """(recipe file's code, registry name, "module:Class") from the document's two code blocks."""
    section = DOC.read_text().split("### Adding a recipe", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    code, registry_line = blocks[0], blocks[1]
    name, where = re.search(r'"([\w-]+)": "([\w.]+:\w+)"', registry_line).groups()
    return code, name, where


def test_the_documented_recipe_trains_like_fsdp(tmp_path, monkeypatch):
    code, name, where = _example()
    module, cls = where.split(":")
    package = tmp_path / "wb_doc_example"   # the document's file, outside the source tree
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / f"{module}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    RECIPES.add(name, f"wb_doc_example.{module}:{cls}")
    base = ["steps=3", "progress=false", "checkpoint.every=0", "optim.warmup_steps=1"]
    started = not dist.is_initialized()
    try:
        ours = train(RunConfig.from_toml(TINY, [*base, f"recipe={name}", f"run_dir={tmp_path / 'ours'}"]))
        train(RunConfig.from_toml(TINY, [*base, "recipe=fsdp", "fsdp.reshard_after_forward=false",
                                       f"run_dir={tmp_path / 'ref'}"]))
    finally:
        RECIPES.remove(name)
        sys.modules.pop(f"wb_doc_example.{module}", None)
        if started and dist.is_initialized():
            dist.destroy_process_group()
    assert ours.recipe == name and ours.steps == 3
    assert losses(tmp_path / "ours") == pytest.approx(losses(tmp_path / "ref"), rel=1e-12)
