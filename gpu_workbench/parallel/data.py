"""Data: every sample is a pure function of (seed, step, sample index), so any rank can make its share
of any step, and a resumed run sees exactly the batches it would have seen.

Global batch of step s = samples 0 .. global_batch-1 of step s. Data-parallel rank r of dp takes the
contiguous slice [r * G/dp, (r+1) * G/dp) and cuts it into `accum` micro-batches of `micro_batch`;
the union over ranks is the single-process batch.

- synthetic: a hidden permutation `perm` of the vocabulary; each next token is perm[previous token],
  except with probability `noise` a uniform random token. The best possible loss is about
  noise * ln(V) + H(noise) (0.75 nats for V=64, noise=0.1) against ln(V) = 4.16 for guessing.
- bytes: a byte-level token file (`wb data prepare`), read with numpy.memmap; a sample is a window
  at a random offset.

Two splits: "train", and "val", the held-out data evaluation reads (`[eval]`). Synthetic: the same task,
samples from a seed stream training never draws from. Bytes: the file's last `data.val_fraction`, which
training windows never reach (every window lies wholly inside its split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.runtime.errors import UserError

_PERM_STREAM = 2**31 - 1   # a seed-sequence entry no step index reaches
_VAL_STREAM = 2**31 - 2    # the validation split's samples: (seed, _VAL_STREAM, batch, index)
SPLITS = ("train", "val")


def rank_slice(global_batch: int, rank: int, dp: int) -> range:
    per_rank = global_batch // dp
    return range(rank * per_rank, (rank + 1) * per_rank)


def micro_batches(global_batch: int, micro_batch: int, rank: int, dp: int) -> list[range]:
    """The sample indices of each micro-batch this rank runs in one optimizer step."""
    mine = rank_slice(global_batch, rank, dp)
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


class Dataset:
    """`ds.batch(step, indices)` -> (inputs, targets), each (len(indices), seq_len) int64."""

    def __init__(self, cfg: RunConfig):
        self.seed, self.seq_len, self.vocab = cfg.seed, cfg.model.seq_len, cfg.model.vocab_size
        self.kind, self.noise = cfg.data.kind, cfg.data.noise
        if self.kind == "synthetic":
            self.perm = np.random.default_rng([self.seed, _PERM_STREAM]).permutation(self.vocab)
        else:
            self.tokens = np.memmap(cfg.data.path, dtype=np.uint8, mode="r")
            self.val_start = int(len(self.tokens) * (1 - cfg.data.val_fraction))
            parts = [("training", self.val_start)]
            if cfg.eval.every:   # the tail is reserved either way; it must hold a window only when read
                parts.append(("held-out", len(self.tokens) - self.val_start))
            for split, size in parts:
                if size < self.seq_len + 1:
                    raise UserError(f"data.path {cfg.data.path}: its {split} part (data.val_fraction = "
                                    f"{cfg.data.val_fraction} of {len(self.tokens)} tokens) holds {size} tokens, "
                                    f"fewer than model.seq_len + 1 = {self.seq_len + 1}")

    def _stream(self, split: str, step: int, index: int) -> list[int]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [self.seed, step, index] if split == "train" else [self.seed, _VAL_STREAM, step, index]

    def _draws(self, step: int, index: int, split: str) -> tuple[int, np.ndarray, np.ndarray]:
        """A synthetic sample's random draws: first token, which positions are noise, noise tokens."""
        rng = np.random.default_rng(self._stream(split, step, index))
        n = self.seq_len + 1
        return int(rng.integers(self.vocab)), rng.random(n) < self.noise, rng.integers(self.vocab, size=n)

    def sample(self, step: int, index: int, split: str = "train") -> np.ndarray:
        return self.samples(step, [index], split)[0]

    def samples(self, step: int, indices: range | list[int], split: str = "train") -> np.ndarray:
        """(len(indices), seq_len + 1) int64 tokens of `split`; `step` is the batch's index in it."""
        n = self.seq_len + 1
        if self.kind == "bytes":
            lo, hi = (0, self.val_start) if split == "train" else (self.val_start, len(self.tokens))
            starts = [lo + int(np.random.default_rng(self._stream(split, step, i)).integers(0, hi - lo - n + 1))
                      for i in indices]
            return np.stack([np.asarray(self.tokens[s:s + n], dtype=np.int64) for s in starts])
        first, noisy, rand = zip(*(self._draws(step, i, split) for i in indices), strict=True)
        noisy, rand = np.stack(noisy), np.stack(rand)
        seq = np.empty((len(first), n), dtype=np.int64)
        seq[:, 0] = first
        for t in range(1, n):   # the chain, vectorised over the samples
            seq[:, t] = np.where(noisy[:, t], rand[:, t], self.perm[seq[:, t - 1]])
        return seq

    def batch(self, step: int, indices: range | list[int], split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.from_numpy(self.samples(step, indices, split))
        # Contiguous: torch 2.11's pipeline checks the first stage's input strides against its own
        # (PipeliningShapeError on a view); 2.13 checks only under TORCH_DISTRIBUTED_DEBUG=DETAIL.
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def prepare_bytes(text_file: str | Path, out: str | Path) -> int:
    """Write the file's raw bytes as a uint8 token file (vocab 256); return the token count."""
    src = Path(text_file)
    if not src.is_file():
        raise UserError(f"TEXT_FILE not found: {src}")
    data = np.frombuffer(src.read_bytes(), dtype=np.uint8)
    if data.size < 2:
        raise UserError(f"TEXT_FILE {src} has {data.size} bytes; need at least 2")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    data.tofile(tmp)
    tmp.replace(out)
    return int(data.size)
