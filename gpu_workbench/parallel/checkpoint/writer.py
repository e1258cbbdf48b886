"""Writing a universal checkpoint's dcp/ folder, in the foreground (dcp.save) or, with
`checkpoint.async_save`, staged to host memory and written by a background thread (dcp.async_save): the
loop waits only for the copy. The checkpoint is published (meta.json, the rename; checkpoint/__init__.py)
only after every rank's background write has finished.

The background write coordinates the ranks through a gloo group of its own, made once: on the training
loop's group its collectives would interleave with the loop's, in an order that differs from rank to rank.
`fault.checkpoint_write_delay_s` holds each background write that long before it writes (a deterministic
window for the tests that kill a run mid-write).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

_GROUP: dict = {}   # {the default group: the background writes' own}, made by the first async save
_STAGER: list = []  # one host-memory stager for the run: its buffers are reused (a fresh one costs 3-15x more)


@dataclass
class Written:
    """What a rank's save leaves to publish: the tensor map (incremental), the chain length, and the
    background write to wait for (None: written already)."""

    tensors: dict | None = None
    chain: int = 0
    pending: Future | None = None

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()   # re-raises the background write's error here
            self.pending = None

    def finished(self) -> bool:
        return self.pending is None or self.pending.done()


def _async_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if world not in _GROUP:   # a new default group (a process that trains twice) gets its own too
        _GROUP.clear()
        _GROUP[world] = dist.new_group(backend="gloo")   # collective: every rank's first async save
    return _GROUP[world]


def _stager():
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    if not _STAGER:   # plain host memory, copied before async_save returns (no pinned or shared memory)
        _STAGER.append(DefaultStager(StagingOptions(False, False, False, False)))
    return _STAGER[0]


def close() -> None:
    """Free the stager's buffers (the end of training, once no background write is pending)."""
    while _STAGER:
        _STAGER.pop().close()


def _slow_writer(folder: str, delay_s: float):
    """A FileSystemWriter that sleeps `delay_s` before writing its data (in the background thread)."""
    from torch.distributed.checkpoint import FileSystemWriter

    class SlowWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            time.sleep(delay_s)
            return super().write_data(plan, planner)

    return SlowWriter(folder)


@contextlib.contextmanager
def dcp_quiet():
    """DCP warns on every call without a process group that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def write(request: dict, folder: Path, background: bool, delay_s: float = 0.0) -> Future | None:
    """Write `request` into `folder` with DCP; background: return the write's Future once the state is
    staged in host memory."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from gpu_workbench.parallel.runtime import compat

    alone = not dist.is_initialized()
    if alone and background:   # DCP's one-process warning, raised in the background thread: the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    if not background:
        with dcp_quiet():
            dcp.save(request, checkpoint_id=str(folder), no_dist=alone)
        return None
    writer = _slow_writer(str(folder), delay_s) if delay_s > 0 else None
    with dcp_quiet():
        response = compat.dcp_async_save()(request, checkpoint_id=None if writer else str(folder),
                                           storage_writer=writer, process_group=_async_group(), no_dist=alone,
                                           async_stager=_stager())
    return compat.async_write_future(response)
