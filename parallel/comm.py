"""Bytes communicated, counted where the tensors are handed to the network, for summary.json.

The count is the payload each worker sends per collective or per push/pull (a tensor's bytes), not
the wire traffic of a particular algorithm (a ring all-reduce sends 2(N-1)/N of it): the same ruler for
ddp's gradient all-reduce, local SGD's parameter average and a parameter server's push + pull.
"""

from __future__ import annotations

import torch


class CommCounter:
    def __init__(self) -> None:
        self.bytes = 0
        self.ops = 0

    def add(self, *tensors: torch.Tensor) -> None:
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        self.ops += 1


def comm_summary(bytes_total: int, updates: int, samples: int, elapsed_s: float, ops: int | None = None) -> dict:
    """The fields every recipe of the async-vs-sync comparison adds to summary.json."""
    return {
        "updates": updates,
        "updates_per_s": updates / elapsed_s if elapsed_s > 0 else None,
        "samples": samples,
        "bytes_communicated": bytes_total,
        "bytes_per_update": bytes_total / updates if updates else None,
        "bytes_per_sample": bytes_total / samples if samples else None,
        "comm_ops": ops,
    }
