"""data.workers: background threads that make the next steps' batches while the model runs the current one.

A batch is a pure function of (step, indices, split), so what a worker made ahead is exactly what would
have been made on demand: prefetching cannot change a run's numbers, and nothing of it needs saving.
Threads, not processes: a batch is numpy slicing of memory-mapped shards (no tokenizing at train time).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from gpu_workbench.parallel.tokens.loader import TokenDataset

DEPTH = 2   # steps ahead


class Prefetcher:
    def __init__(self, dataset: TokenDataset, workers: int, steps: int):
        self.dataset, self.steps = dataset, steps
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="wb-data")
        self.pending: dict[tuple, Future] = {}

    def __getattr__(self, name: str):   # locate, documents, state, sources: the dataset's
        return getattr(self.dataset, name)

    def batch(self, step: int, indices, split: str = "train"):
        key = (split, step, tuple(indices))
        ahead = self.pending.pop(key, None)
        self.dataset.record(step, indices, split)
        result = ahead.result() if ahead is not None else self.dataset.fetch(step, indices, split)
        if split == "train":
            for later in range(step + 1, min(step + 1 + DEPTH, self.steps)):
                nxt = (split, later, key[2])
                if nxt not in self.pending:
                    self.pending[nxt] = self.pool.submit(self.dataset.fetch, later, list(indices), split)
            for stale in [k for k in self.pending if k[0] == split and k[1] <= step]:
                self.pending.pop(stale)
        return result


def make_loader(cfg):
    dataset = TokenDataset(cfg)
    return Prefetcher(dataset, cfg.data.workers, cfg.steps) if cfg.data.workers > 0 else dataset
