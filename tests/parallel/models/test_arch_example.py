"""The architecture document's "Adding an architecture" example is real: its file, registered as the
document says (one registry line), builds a model whose parameter count is the spec's count from the shapes,
and trains under `ddp tp.degree=2` and `pipeline pp.degree=2` (one 2-rank launch) with `single`'s per-step
losses, gradient norms and final parameters."""

from __future__ import annotations

import re

import pytest

from gpu_workbench.parallel import RunConfig, models
from gpu_workbench.parallel.models.transformer import build, count_params
from tests.helpers.runs import ROOT, TINY, assert_matches_single, torchrun, train_single

DOC = ROOT / "docs" / "ARCHITECTURE.md"
BASE = ["steps=4", "progress=false", "checkpoint.every=0", "checkpoint.save_final=true", "optim.warmup_steps=1",
        "model.n_layers=2", "global_batch=8", "micro_batch=2"]
RUNS = {"ddp-tp": ["recipe=ddp", "tp.degree=2"], "pipeline": ["recipe=pipeline", "pp.degree=2", "pp.gantt=false"]}


def _example() -> tuple[str, str, str]:
    """(the architecture file's code, registry name, "module:SPEC") from the document's two code blocks."""
    section = DOC.read_text().split("### Adding an architecture", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    name, where = re.search(r'"([\w-]+)": "([\w.]+:\w+)"', blocks[1]).groups()
    return blocks[0], name, where


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The example registered in this process and in the launch's ranks; the runs' directories."""
    code, name, where = _example()
    module, attribute = where.split(":")
    root = tmp_path_factory.mktemp("arch")
    (root / "wb_doc_arch").mkdir()
    (root / "wb_doc_arch" / "__init__.py").write_text("")
    (root / "wb_doc_arch" / f"{module}.py").write_text(code)
    plugin = f"wb_doc_arch.{module}:{attribute}"
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        models.ARCHS.add(name, plugin)
        dirs = {run: root / run for run in ["single", *RUNS]}
        arch = [*BASE, f"model.arch={name}"]
        train_single(dirs["single"], arch)
        torchrun(2, [(TINY, [*arch, *o, f"run_dir={dirs[r]}"]) for r, o in RUNS.items()], archs={name: plugin},
                 path=str(root))
        yield name, dirs
        models.ARCHS.remove(name)


def test_the_counts_from_the_shapes_are_the_model_built(toy):
    name, _ = toy
    for tie in ("true", "false"):
        cfg = RunConfig.from_toml(TINY, [*BASE, f"model.arch={name}", f"model.tie_embeddings={tie}"]).model
        model = build(cfg)
        assert count_params(model) == models.get(name).n_params(cfg)
        assert type(model.blocks[0].mlp).__name__ == "SquaredReLU" and model.pos_emb is None   # its parts


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_the_documented_architecture_trains_like_single(toy, run):
    _, dirs = toy
    assert_matches_single(dirs[run], dirs["single"], steps=4)
