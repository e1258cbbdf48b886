"""model.moe and ep.degree mistakes: one line naming the argument, exit code 2, before any process starts
(through the CLI's entry point in-process, as tests/parallel/loop/test_cli_errors.py)."""

from __future__ import annotations

import pytest

from tests.helpers.runs import refused_in_process

LLAMA = ["model.arch=llama", "model.moe.experts=4"]
BAD = [
    ([*LLAMA, "model.moe.top_k=5"], "model.moe.top_k (5) must be between 1 and model.moe.experts (4)"),
    ([*LLAMA, "model.moe.capacity_factor=-1"], "model.moe.capacity_factor must be > 0 (or 0 for dropless)"),
    ([*LLAMA, "model.moe.every=3"], "model.moe.every (3) must be between 1 and model.n_layers (2)"),
    ([*LLAMA, "model.moe.score=relu"], "model.moe.score must be one of 'softmax' | 'sigmoid'"),
    (["model.moe.experts=4"], "model.moe.experts needs an architecture with a SwiGLU MLP"),   # gpt2
    ([*LLAMA, "--recipe", "pipeline", "--nproc", "2"], "model.moe.experts does not work with recipe=pipeline"),
    ([*LLAMA, "--recipe", "ddp", "--nproc", "3", "ep.degree=3"],
     "model.moe.experts (4) must be divisible by ep.degree (3)"),
    ([*LLAMA, "--recipe", "ddp", "--nproc", "2", "ep.degree=4"],
     "ep.degree (4) must divide the data-parallel ranks (2)"),
    ([*LLAMA, "--recipe", "ddp", "--nproc", "4", "tp.degree=2", "ep.degree=4"],
     "ep.degree (4) must divide the data-parallel ranks (2)"),
    (["model.arch=llama", "--recipe", "ddp", "--nproc", "2", "ep.degree=2"], "ep.degree = 2 needs experts to split"),
    ([*LLAMA, "--recipe", "zero2", "--nproc", "2", "ep.degree=2"], "ep.degree = 2 does not work with recipe=zero2"),
    ([*LLAMA, "ep.degree=0"], "ep.degree must be >= 1"),
    ([*LLAMA, "--recipe", "ddp", "--nproc", "2", "ep.degree=2", "cp.degree=2"],
     "ep.degree (2) must divide the data-parallel ranks (1)"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_moe_mistakes_one_line_exit_2(args, message, capsys):
    refused_in_process(capsys, args, message)
