"""The loader of data.kind = "tokens": fixed-length windows of prepared datasets (shards.py), chosen under
the seed, as a pure function of the global sample index g = step * global_batch + index.

- Packing is concat-then-split: a dataset's documents, each closed by EOS, form one stream; window k of a
  source is its tokens [k * seq_len, k * seq_len + seq_len + 1) (inputs and targets shifted by one).
- The sources of data.mix draw by weight (mix.py). Source s's n-th sample is window perm_e[n mod W_s] of its
  training part, epoch e = n div W_s, perm_e a permutation under (seed, s, e): every window once per epoch.
- Splits: a source's last data.val_fraction of tokens is its held-out part; training windows never reach it.
  Held-out batches take its windows in order.
- Data-parallel rank r takes its slice of each global batch (data.py: micro_batches); tensor, context and
  pipeline peers share a data-parallel coordinate and so get the same rows.

`state(step)` is the loader position a checkpoint records (the global sample index, each source's samples
consumed and its epoch); since it is a function of the step, a resume under any data-parallel degree
continues the same global sample sequence. WB_SAMPLE_LOG=DIR appends every training sample's id to
DIR/samples-<pid>.jsonl (the resume tests read it).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.tokens.check import MIX_STREAM, check_config, loader_state, mix_entries
from gpu_workbench.parallel.tokens.mix import Mix
from gpu_workbench.parallel.tokens.shards import TokenData, open_dataset

_VAL_MIX_STREAM, _EPOCH_STREAM = 2**31 - 4, 2**31 - 5


class Source:
    """One dataset's training and held-out windows."""

    def __init__(self, data: TokenData, seq_len: int, val_fraction: float):
        self.data, self.seq_len = data, seq_len
        self.val_start = int(data.n_tokens * (1 - val_fraction))
        self.n_train = max((self.val_start - 1) // seq_len, 0)
        self.n_val = max((data.n_tokens - self.val_start - 1) // seq_len, 0)
        self._perm = lru_cache(maxsize=4)(self._make_perm)
        self.index = 0

    def _make_perm(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, _EPOCH_STREAM, self.index, epoch]).permutation(self.n_train)

    def train_window(self, seed: int, n: int) -> tuple[int, int]:
        """(epoch, window) of this source's n-th training sample."""
        epoch, pos = divmod(n, self.n_train)
        return epoch, int(self._perm(seed, epoch)[pos])

    def start(self, window: int, split: str) -> int:
        base = 0 if split == "train" else self.val_start
        return base + (window if split == "train" else window % self.n_val) * self.seq_len


class TokenDataset:
    """`batch(step, indices, split)` -> (inputs, targets), as data.Dataset; `documents(...)`: each input
    position's document number (for data.document_mask); `state(step)`: the loader position."""

    def __init__(self, cfg):
        self.cfg, self.seed, self.seq_len, self.global_batch = cfg, cfg.seed, cfg.model.seq_len, cfg.global_batch
        check_config(cfg)
        entries = mix_entries(cfg.data)
        self.sources = [Source(open_dataset(folder, "data.mix" if cfg.data.mix else "data.path"), self.seq_len,
                               cfg.data.val_fraction) for folder, _ in entries]
        for i, source in enumerate(self.sources):
            source.index = i
        self.mix = Mix([w for _, w in entries], self.seed, MIX_STREAM)
        self.val_mix = Mix([w for _, w in entries], self.seed, _VAL_MIX_STREAM)
        check_windows(self.sources, [f for f, _ in entries], self.seq_len, cfg.eval.every > 0)
        self.log = Path(os.environ["WB_SAMPLE_LOG"]) if os.environ.get("WB_SAMPLE_LOG") else None

    def locate(self, step: int, index: int, split: str) -> tuple[int, int, int, int]:
        """(global index, source, epoch, stream start) of one sample."""
        g = step * self.global_batch + index
        if split == "train":
            s, n = self.mix.locate(g)
            epoch, window = self.sources[s].train_window(self.seed, n)
            return g, s, epoch, self.sources[s].start(window, "train")
        s, n = self.val_mix.locate(g)
        return g, s, 0, self.sources[s].start(n, "val")

    def samples(self, step: int, indices, split: str = "train") -> np.ndarray:
        where = [self.locate(step, i, split) for i in indices]
        return np.stack([self.sources[s].data.window(start, self.seq_len + 1) for _, s, _, start in where])

    def documents(self, step: int, indices, split: str = "train") -> torch.Tensor:
        """(len(indices), seq_len) int32: each input token's document number within its window (0 first)."""
        where = [self.locate(step, i, split) for i in indices]
        docs = np.stack([self.sources[s].data.doc_ids(start, self.seq_len) for _, s, _, start in where])
        return torch.from_numpy((docs - docs[:, :1]).astype(np.int32))

    def fetch(self, step: int, indices, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.from_numpy(self.samples(step, indices, split))
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def batch(self, step: int, indices, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        self.record(step, indices, split)
        return self.fetch(step, indices, split)

    def state(self, step: int) -> dict:
        return loader_state(self.cfg, step)

    def record(self, step: int, indices, split: str) -> None:
        """WB_SAMPLE_LOG: the training samples handed to the model (not those prefetched)."""
        if self.log is None or split != "train":
            return
        where = [self.locate(step, i, split) for i in indices]
        self.log.mkdir(parents=True, exist_ok=True)
        with open(self.log / f"samples-{os.getpid()}.jsonl", "a") as f:
            for g, s, epoch, start in where:
                f.write(json.dumps({"step": step, "g": g, "source": s, "epoch": epoch, "start": start}) + "\n")


def check_windows(sources: list[Source], folders: list[str], seq_len: int, held_out: bool) -> None:
    for source, folder in zip(sources, folders, strict=True):
        parts = [("training", source.n_train, source.val_start)]
        if held_out:
            parts.append(("held-out", source.n_val, source.data.n_tokens - source.val_start))
        for split, windows, size in parts:
            if windows < 1:
                raise UserError(f"model.seq_len = {seq_len} is longer than the data: {folder}'s {split} part holds "
                                f"{size} tokens, fewer than seq_len + 1 = {seq_len + 1} (data.val_fraction)")
