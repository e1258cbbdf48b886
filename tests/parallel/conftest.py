"""Shared, session-scoped runs: one torchrun launch trains every data-parallel recipe (fp32 for
equivalence, bf16 for the mixed-precision memory table); the single-process reference runs here."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.helpers.runs import BASE, HAS_DEEPSPEED, TINY, runnable, skip_unless_runnable, torchrun, train_single

DP_RECIPES = ["ddp", "zero1", "zero2", "zero3", "fsdp"]
MEMORY_RECIPES = ["ddp", "zero1", "zero2", "zero3"]
class Runs(dict):
    """{(recipe, precision): run_dir}; a ZeRO run left out for want of DeepSpeed skips the test asking for it."""

    def __missing__(self, key):
        skip_unless_runnable(key[0])
        raise KeyError(key)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for in-process runs: tiny ops on a shared 2-core box run faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """`single`, 10 fp32 steps, in this process."""

    run_dir = tmp_path_factory.mktemp("single")
    train_single(run_dir, BASE)
    return run_dir


@pytest.fixture(scope="session")
def dp_runs(tmp_path_factory):
    """{(recipe, precision): run_dir} for 2-process runs, all from one torchrun launch (without DeepSpeed,
    the runs of the other recipes: a test that asks for a ZeRO run then skips, see Runs)."""
    root = tmp_path_factory.mktemp("dp")
    runs, dirs = [], Runs()
    available = [r for r in DP_RECIPES if runnable(r)]
    for recipe in available:
        dirs[recipe, "fp32"] = root / f"{recipe}-fp32"
        runs.append((TINY, [*BASE, f"recipe={recipe}", f"run_dir={dirs[recipe, 'fp32']}"]))
    for recipe in (r for r in MEMORY_RECIPES if r in available):   # mixed precision, 2 steps: the model-state
        dirs[recipe, "bf16"] = root / f"{recipe}-bf16"                # memory after one step
        runs.append((TINY, [*BASE, f"recipe={recipe}", "precision=bf16", "steps=2", "checkpoint.save_final=false",
                            f"run_dir={dirs[recipe, 'bf16']}"]))
    if HAS_DEEPSPEED:   # ZeRO-2 with the optimizer offloaded to CPU, and ZeRO-3 from a user's DeepSpeed JSON
        offload, from_json = root / "zero2-offload", root / "zero3-dsjson"
        dirs["zero2-offload", "fp32"], dirs["zero3-dsjson", "fp32"] = offload, from_json
        runs.append((TINY, [*BASE, "recipe=zero2", "zero.offload_optimizer=cpu", f"run_dir={offload}"]))
        ds_json = root / "ds.json"
        ds_json.write_text(json.dumps({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
                                       "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}}))
        runs.append((TINY, [*BASE, "recipe=zero3", f"zero.config_file={ds_json}", f"run_dir={from_json}"]))
    torchrun(2, runs)
    return dirs


@pytest.fixture
def cli(capfd):
    """`wb ...` through the CLI's own entry point, in this process (no interpreter start per call):
    returns a CompletedProcess-like (returncode, stdout, stderr)."""
    import torch.distributed as dist

    from gpu_workbench.cli.app import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capfd.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        finally:
            if dist.is_initialized():   # a one-rank group a recipe made in this process
                dist.destroy_process_group()
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run
