"""Which source each global sample index draws from, and how many samples each source gave before it.

The sequence is cut into blocks of BLOCK samples; block b holds each source's fixed share (its weight,
largest remainders, at least one) in an order shuffled under (seed, b). So a source's ordinal, how many of
its samples came before, is a closed form of the index: no state to carry, the same for any split of the
indices over ranks, and the mix state a checkpoint records (`consumed`) is exact at every index.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

BLOCK = 4096


def block_counts(weights: list[float]) -> np.ndarray:
    """Each source's samples per block: weight shares of BLOCK by largest remainders, at least one each."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights) * BLOCK
    counts = np.maximum(np.floor(share).astype(np.int64), 1)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    for i in order[:max(BLOCK - int(counts.sum()), 0)]:
        counts[i] += 1
    while counts.sum() > BLOCK:   # the minimum of one pushed the sum over: take from the largest
        counts[int(np.argmax(counts))] -= 1
    return counts


class Mix:
    def __init__(self, weights: list[float], seed: int, stream: int):
        self.counts, self.seed, self.stream = block_counts(weights), seed, stream
        self._block = lru_cache(maxsize=8)(self._make_block)

    def _make_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, that source's ordinal within the block) for block b."""
        rng = np.random.default_rng([self.seed, self.stream, b])
        source = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))
        ordinal = np.empty(BLOCK, dtype=np.int64)
        for s in range(len(self.counts)):
            where = source == s
            ordinal[where] = np.arange(int(where.sum()))
        return source, ordinal

    def locate(self, g: int) -> tuple[int, int]:
        """(source, its ordinal: samples it gave before global index g)."""
        b, j = divmod(g, BLOCK)
        source, ordinal = self._block(b)
        s = int(source[j])
        return s, b * int(self.counts[s]) + int(ordinal[j])

    def consumed(self, g: int) -> list[int]:
        """Samples each source gave to global indices 0 .. g-1."""
        b, j = divmod(g, BLOCK)
        source, _ = self._block(b)
        return [b * int(c) + int((source[:j] == s).sum()) for s, c in enumerate(self.counts)]
