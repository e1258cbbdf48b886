"""Bytes communicated, counted where the tensors are handed to the network, for summary.json.

One ruler for every recipe: the bytes all workers together hand to the network plus the bytes they
get back, counted as tensor payload. An all-reduce of M bytes on N ranks counts 2 x M x N (each rank
sends its M and receives the reduced M); a parameter-server update counts the worker's push (its
gradient) plus its pull (the parameters). It is not the wire traffic of one algorithm (a ring
all-reduce moves 2(N-1)/N x M each way per rank), but it ranks ddp, local SGD, DiLoCo and the
parameter server on the same scale: synchronous async-ps (staleness 0) counts exactly ddp's bytes.
"""

from __future__ import annotations

import time

import torch

from gpu_workbench.parallel.runtime.summary import CommStats


class CommCounter:
    def __init__(self) -> None:
        self.bytes = 0
        self.ops = 0
        self.last_add_ns = None   # perf_counter_ns of the newest add (DDP: when backward issued its last bucket)

    def add(self, *tensors: torch.Tensor) -> None:
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        self.ops += 1
        self.last_add_ns = time.perf_counter_ns()


def comm_summary(bytes_total: int, updates: int, samples: int, elapsed_s: float, ops: int | None = None,
                 **extra) -> CommStats:
    """The summary part every recipe of the async-vs-sync comparison fills (`RunSummary.comm`)."""
    return CommStats(updates=updates, updates_per_s=updates / elapsed_s if elapsed_s > 0 else None,
                     samples=samples, bytes_communicated=bytes_total,
                     bytes_per_update=bytes_total / updates if updates else None,
                     bytes_per_sample=bytes_total / samples if samples else None, comm_ops=ops, **extra)
