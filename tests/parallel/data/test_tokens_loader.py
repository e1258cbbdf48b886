"""data.kind = "tokens": the loader's windows, mix and splits; data.document_mask end to end (a packed window
under the mask gives each document the logits it gets alone); and one line for each bad data setting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers.cli import one_line, wb
from tests.helpers.runs import TINY

SMALL = ["progress=false", "model.d_model=32", "model.n_layers=1", "model.vocab_size=256", "model.seq_len=16",
         "global_batch=4", "micro_batch=2", "steps=2", "checkpoint.every=0", "checkpoint.save_final=false",
         "data.kind=tokens"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two byte-level datasets: 'a' of many short documents, 'b' of a few long ones."""
    from gpu_workbench.parallel.tokens.prepare import prepare

    root = tmp_path_factory.mktemp("tokens")
    docs = {"a": [f"doc {i}: " + "ab" * (i % 7) for i in range(300)], "b": ["The quick brown fox. " * 40] * 6}
    for name, texts in docs.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        prepare([str(root / f"{name}.jsonl")], "bytes", root / name, workers=1, progress=False)
    return root


def _cfg(*overrides):
    from gpu_workbench.parallel import RunConfig

    return RunConfig.from_toml(TINY, [*SMALL, *overrides])


def test_windows_mix_and_splits(data):
    from gpu_workbench.parallel.data import Dataset
    from gpu_workbench.parallel.tokens.shards import open_dataset

    cfg = _cfg(f"data.mix=['{data / 'a'}:1', '{data / 'b'}:3']", "global_batch=64", "micro_batch=64")
    ds = Dataset(cfg)
    where = [ds.locate(0, i, "train") for i in range(64)]
    share = sum(s == 1 for _, s, _, _ in where) / 64
    assert 0.6 < share < 0.9                                              # weight 3 of 4
    stream = open_dataset(data / "a")
    x, y = ds.batch(0, range(64))
    g, s, _, start = where[0]
    assert torch.equal(x[0], torch.from_numpy(ds.sources[s].data.window(start, 16)))
    assert torch.equal(x[:, 1:], y[:, :-1]) and all(st % 16 == 0 for *_, st in where)   # concat-then-split
    val = [ds.locate(0, i, "val") for i in range(64)]
    assert all(st >= ds.sources[s].val_start for _, s, _, st in val)      # held-out windows lie in the tail
    assert all(st + 17 <= ds.sources[s].val_start for _, s, _, st in where)
    docs = ds.documents(0, range(64))
    assert docs.shape == (64, 16) and (docs[:, 0] == 0).all() and (docs.diff(dim=1) >= 0).all()
    eos_at = (x == 0)                                                     # bytes: EOS is 0; a new document follows it
    assert torch.equal(docs[:, 1:] - docs[:, :-1], eos_at[:, :-1].int())
    assert stream.n_tokens == ds.sources[0].data.n_tokens
    again = Dataset(cfg)
    assert torch.equal(again.batch(5, range(64))[0], ds.batch(5, range(64))[0])   # a pure function of the seed
    other = Dataset(_cfg(f"data.mix=['{data / 'a'}:1', '{data / 'b'}:3']", "global_batch=64", "micro_batch=64",
                         "seed=1"))
    assert not torch.equal(other.batch(0, range(64))[0], x)


def test_document_mask_gives_each_document_its_own_logits():
    """llama (rotary: relative positions): under the mask a packed window's logits for each document equal
    that document's logits alone; unmasked they do not (the negative control)."""
    from gpu_workbench.parallel.config import ModelConfig
    from gpu_workbench.parallel.models.transformer import build
    from gpu_workbench.parallel.runtime import documents

    torch.manual_seed(0)
    model = build(ModelConfig(arch="llama", vocab_size=64, seq_len=23, d_model=32, n_layers=2, n_heads=4,
                              n_kv_heads=2)).double()
    idx = torch.randint(0, 64, (1, 23))
    ids = torch.tensor([[0] * 9 + [1] + [2] * 13])   # a one-token document in the middle
    with documents.using(ids):
        packed = model(idx)
    alone = torch.cat([model(idx[:, ids[0] == d]) for d in range(3)], dim=1)
    assert (packed - alone).abs().max() < 1e-10
    assert (model(idx) - alone).abs().max() > 1e-3


def test_document_mask_trains_and_refuses_what_it_cannot_mask(data, tmp_path):
    from gpu_workbench.parallel import recipes, train
    from gpu_workbench.parallel.runtime.errors import UserError

    done = train(_cfg(f"data.path={data / 'a'}", "data.document_mask=true", "model.arch=llama",
                      "model.n_kv_heads=2", f"run_dir={tmp_path / 'run'}", "eval.every=1"))
    assert done.steps == 2 and np.isfinite(done.final_loss)
    for extra, needle in ((["cp.degree=2", "recipe=ddp"], "ring attention takes no document mask"),
                          (["recipe=pipeline", "pp.degree=2"], "not recipe pipeline"),
                          (["model.activation_checkpointing=true"], "recompute would run without the mask")):
        cfg = _cfg(f"data.path={data / 'a'}", "data.document_mask=true", *extra)
        with pytest.raises(UserError, match=needle):
            recipes.resolve(cfg.validate(), 2)
    with pytest.raises(UserError, match="data.document_mask needs data.kind = 'tokens'"):
        _cfg("data.kind=synthetic", "data.document_mask=true").validate()


def test_bad_data_settings_one_line(data, tmp_path):
    from gpu_workbench.parallel.data import Dataset
    from gpu_workbench.parallel.runtime.errors import UserError

    one_line(wb("train", "--config", TINY, *SMALL, f"data.path={data / 'a'}", "model.vocab_size=200"),
             "its tokenizer (bytes) has 256 tokens, more than model.vocab_size = 200")
    cases = [([f"data.path={data / 'b'}", "model.seq_len=8192"], "model.seq_len = 8192 is longer than the data"),
             ([f"data.mix=['{data / 'a'}:1', '{data / 'b'}:0']"], "the weight must be > 0, got 0"),
             ([f"data.mix=['{data / 'a'}']"], "must be DATA_DIR:WEIGHT"),
             ([f"data.path={tmp_path}"], "no manifest.json"),
             ([f"data.path={data / 'a'}", f"data.mix=['{data / 'a'}:1']"], "not both")]
    for overrides, needle in cases:
        with pytest.raises(UserError, match=needle):
            Dataset(_cfg(*overrides).validate())
    import shutil

    for damage, needle in (("truncate", "truncated since prepare"), ("change", "changed since prepare")):
        copy = tmp_path / damage
        shutil.copytree(data / "a", copy)
        shard = next((copy / "shards").glob("*.bin"))
        raw = bytearray(shard.read_bytes())
        shard.write_bytes(raw[:-2] if damage == "truncate" else bytes([raw[0] ^ 1]) + raw[1:])
        with pytest.raises(UserError, match=needle):
            Dataset(_cfg(f"data.path={copy}").validate())
