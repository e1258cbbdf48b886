"""The GPT and the data: shapes, tying, activation checkpointing, determinism, disjoint rank slices,
and a synthetic task that the tiny model learns well below ln(vocab)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gpu_workbench.parallel import RunConfig, train
from gpu_workbench.parallel.data import Dataset, micro_batches
from gpu_workbench.parallel.models.transformer import GPT, count_params
from tests.helpers.runs import TINY


def _cfg(*overrides):
    return RunConfig.from_toml(TINY, list(overrides))


def test_gpt_shapes_tying_and_blocks():
    cfg = _cfg()
    model = GPT(cfg.model)
    idx = torch.randint(0, 64, (3, 32))
    assert model(idx).shape == (3, 32, 64)
    loss = model(idx, torch.randint(0, 64, (3, 32))).detach()
    assert loss.ndim == 0 and abs(float(loss) - math.log(64)) < 0.3   # near uniform at init
    assert model.head.weight is model.tok_emb.weight
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2
    untied = GPT(_cfg("model.tie_embeddings=false").model)
    assert count_params(untied) == count_params(model) + 64 * 64


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = GPT(_cfg().model)
    ckpt = GPT(_cfg("model.activation_checkpointing=true").model)
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 64, (2, 32))
    plain(idx, idx).backward()
    ckpt(idx, idx).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_data_is_a_function_of_seed_step_index():
    ds = Dataset(_cfg())
    a, b = ds.batch(5, [0, 1, 2]), Dataset(_cfg()).batch(5, [0, 1, 2])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])             # targets are the inputs shifted by one
    assert not torch.equal(ds.batch(6, [0])[0], ds.batch(5, [0])[0])
    assert not torch.equal(Dataset(_cfg("seed=1")).batch(5, [0])[0], a[0][:1])


@pytest.mark.parametrize(("dp", "micro"), [(1, 16), (2, 4), (4, 2), (2, 8)])
def test_rank_slices_are_disjoint_and_cover_the_batch(dp, micro):
    seen = [i for rank in range(dp) for mb in micro_batches(16, micro, rank, dp) for i in mb]
    assert sorted(seen) == list(range(16)) and len(set(seen)) == 16
    assert all(len(mb) == micro for rank in range(dp) for mb in micro_batches(16, micro, rank, dp))


def test_synthetic_task_is_learned(tmp_path):
    """Well below ln(64) = 4.16 within 60 steps; tiny.toml's target_loss is reached."""
    s = train(_cfg("steps=60", "progress=false", "checkpoint.every=0", f"run_dir={tmp_path}")).flat()
    assert s["final_loss"] < 0.4 * math.log(64)
    assert s["time_to_target_s"] is not None and s["time_to_target_s"] <= s["elapsed_s"]


def test_bytes_dataset_reads_memmap(tmp_path):
    path = tmp_path / "d.bin"
    np.arange(200, dtype=np.uint8).tofile(path)
    ds = Dataset(_cfg("data.kind=bytes", f"data.path={path}", "model.vocab_size=256"))
    x, y = ds.batch(0, [0, 1])
    assert x.shape == (2, 32) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(2, 31, dtype=torch.long))


def test_the_validation_split_is_held_out(tmp_path):
    """Bytes: training windows never reach the file's tail, held-out ones lie inside it. Synthetic: the
    held-out samples come from their own stream, the same task (the hidden permutation)."""
    path = tmp_path / "d.bin"
    np.array([1] * 768 + [2] * 256, dtype=np.uint8).tofile(path)   # the last quarter is 2s
    ds = Dataset(_cfg("data.kind=bytes", f"data.path={path}", "model.vocab_size=256", "eval.every=1",
                      "data.val_fraction=0.25"))
    train = np.concatenate([ds.samples(step, range(16), "train") for step in range(8)])
    held_out = np.concatenate([ds.samples(step, range(16), "val") for step in range(8)])
    assert (train == 1).all() and (held_out == 2).all()
    syn = Dataset(_cfg())
    a, b = syn.samples(3, range(4), "train"), syn.samples(3, range(4), "val")
    assert not np.array_equal(a, b)
    assert (syn.perm[b[:, :-1]] == b[:, 1:]).mean() > 0.8   # the held-out data obeys the same rule
    with pytest.raises(ValueError, match="split"):
        syn.samples(0, [0], "test")
