"""The config checks of data.kind = "tokens", from the manifests alone (no torch, no shard read): the recipe's
validate runs them before any process starts, and the loader again where it opens the data."""

from __future__ import annotations

from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.tokens.shards import read_manifest

MIX_STREAM = 2**31 - 3   # the training mix's seed stream (loader.py)


def mix_entries(data_cfg) -> list[tuple[str, float]]:
    """[(DATA_DIR, weight)]: data.mix ("DIR:WEIGHT" each) or data.path alone with weight 1."""
    if not data_cfg.mix:
        return [(data_cfg.path, 1.0)]
    out = []
    for item in data_cfg.mix:
        folder, sep, text = item.rpartition(":")
        try:
            weight = float(text) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not sep or weight != weight:
            raise UserError(f"data.mix entry '{item}' must be DATA_DIR:WEIGHT (e.g. 'runs/wiki:3')")
        if weight <= 0:
            raise UserError(f"data.mix entry '{item}': the weight must be > 0, got {text}")
        out.append((folder, weight))
    return out


def check_config(cfg) -> None:
    data = cfg.data
    if data.path and data.mix:
        raise UserError("set data.path (one dataset) or data.mix (several, with weights), not both")
    what = "data.mix" if data.mix else "data.path"
    manifests = [(folder, read_manifest(Path(folder), what)) for folder, _ in mix_entries(data)]
    first = manifests[0][1]["tokenizer"]
    for folder, manifest in manifests:
        tok = manifest["tokenizer"]
        if tok["vocab_size"] > cfg.model.vocab_size:
            raise UserError(f"{what} {folder}: its tokenizer ({tok['spec']}) has {tok['vocab_size']} tokens, more "
                            f"than model.vocab_size = {cfg.model.vocab_size}; raise model.vocab_size")
        if tok["hash"] != first["hash"]:
            raise UserError(f"data.mix: {folder} was prepared with another tokenizer ({tok['spec']}) than "
                            f"{manifests[0][0]} ({first['spec']}); prepare every source with one tokenizer")


def identity(cfg) -> dict:
    """What the resume fingerprint records of the data: each dataset's manifest hash and the tokenizer's."""
    from gpu_workbench.parallel.tokens.shards import identity as manifest_hash

    entries = mix_entries(cfg.data)
    tokenizer = read_manifest(Path(entries[0][0]))["tokenizer"]["hash"]
    return {"data.manifest": [manifest_hash(Path(f)) for f, _ in entries], "data.tokenizer": tokenizer}


def loader_state(cfg, step: int) -> dict:
    """The loader position after `step` optimizer steps (loader.py): the global sample index, each source's
    samples consumed and its epoch; from the manifests' token counts, without reading a shard."""
    from gpu_workbench.parallel.tokens.mix import Mix

    entries = mix_entries(cfg.data)
    g = step * cfg.global_batch
    consumed = Mix([w for _, w in entries], cfg.seed, MIX_STREAM).consumed(g)
    epochs = []
    for (folder, _), n in zip(entries, consumed, strict=True):
        tokens = read_manifest(Path(folder))["tokens"]
        windows = max((int(tokens * (1 - cfg.data.val_fraction)) - 1) // cfg.model.seq_len, 1)
        epochs.append(n // windows)
    return {"global_sample": g, "consumed": consumed, "epoch": epochs}
