"""optim.frozen: parameter-name prefixes kept out of the optimizer. Frozen weights end as they began, the
rest trains, and ddp x2 / fsdp x2 with the same frozen set give single's per-step losses. Two launches:
single in this process, one torchrun of ddp then fsdp."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from gpu_workbench.parallel.runtime.errors import UserError
from tests.helpers.runs import TINY, final_params, losses, torchrun

pytestmark = pytest.mark.slow

FROZEN = 'optim.frozen=["tok_emb", "blocks.0"]'
BASE = ["progress=false", "steps=4", "checkpoint.save_final=true", "optim.warmup_steps=2", FROZEN]


def _cfg(*overrides: str):
    from gpu_workbench.parallel import RunConfig

    return RunConfig.from_toml(TINY, [*BASE, *overrides])


def _initial(cfg) -> dict[str, torch.Tensor]:
    from gpu_workbench.parallel.models.transformer import GPT

    torch.manual_seed(cfg.seed)   # as the trainer does before building the model
    return {k: v.detach().clone() for k, v in GPT(cfg.model).state_dict().items()}


def _is_frozen(name: str) -> bool:   # tiny.toml ties the head to tok_emb: one parameter, frozen too
    return name.startswith(("tok_emb.", "blocks.0.")) or name == "head.weight"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from gpu_workbench.parallel import train

    root = tmp_path_factory.mktemp("frozen")
    with contextlib.redirect_stderr(io.StringIO()):
        train(_cfg("recipe=single", f"run_dir={root / 'single'}"))
    torchrun(2, [(TINY, [*BASE, "recipe=ddp", f"run_dir={root / 'ddp'}"]),
                 (TINY, [*BASE, "recipe=fsdp", f"run_dir={root / 'fsdp'}"])])
    return root


def test_frozen_weights_do_not_change_and_the_rest_trains(runs):
    start, end = _initial(_cfg("recipe=single")), final_params(runs / "single")
    frozen = [k for k in end if _is_frozen(k)]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)
    assert all(not torch.equal(start[k], end[k]) for k in end if not _is_frozen(k) and k.endswith("weight"))


@pytest.mark.parametrize("recipe", ["ddp", "fsdp"])
def test_data_parallel_with_frozen_equals_single_per_step(runs, recipe):
    ref, got = losses(runs / "single"), losses(runs / recipe)
    assert len(ref) == 4 and got == pytest.approx(ref, abs=1e-5)
    end = final_params(runs / recipe)
    assert all(torch.equal(_initial(_cfg("recipe=single"))[k], end[k]) for k in end if _is_frozen(k))


def test_a_prefix_matching_nothing_and_a_recipe_that_cannot_freeze_are_one_line_errors():
    from gpu_workbench.parallel import recipes
    from gpu_workbench.parallel.models.transformer import GPT
    from gpu_workbench.parallel.recipes.base import freeze

    cfg = _cfg("recipe=single")
    with pytest.raises(UserError, match="optim.frozen: 'blocks.9' matches no parameter"):
        freeze(GPT(cfg.model), ["tok_emb", "blocks.9"])   # tiny.toml: blocks.0 and blocks.1
    with pytest.raises(UserError, match="optim.frozen: recipe zero2"):
        recipes.resolve(_cfg("recipe=zero2"), 2)
