"""Every private or version-specific torch API that `parallel` uses, in one place.

torch does not promise these names across releases. Each helper checks for what it needs and, where
it is missing, fails (or degrades, where the feature is optional) with a message naming the torch
version, so a torch upgrade breaks here, visibly, and not deep inside a training run. Tested on the
supported range below (tests/parallel/runtime/test_compat.py exercises every helper).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

SUPPORTED_TORCH = ("2.11", "2.13")   # oldest and newest minor release tested


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def torch_build_version() -> str:
    """torch's version with its build tag, e.g. `2.11.0+cu130` or `2.13.0+cpu`. The CUDA wheels on PyPI (torch
    2.11 to 2.13) carry the tag in `torch.__version__` only: their distribution metadata says `2.11.0`, which
    would hide whether a run used the CUDA or the CPU build; the CPU wheels carry `+cpu` in both."""
    return torch.__version__


def _missing(what: str) -> RuntimeError:
    return RuntimeError(f"torch {torch.__version__} lacks {what}, which gpu-workbench needs (tested on torch "
                        f"{SUPPORTED_TORCH[0]} to {SUPPORTED_TORCH[1]}): see parallel/runtime/compat.py")


def default_store():
    """The default process group's c10d store (for heartbeats), or None without a group.
    Private: `distributed_c10d._get_default_store` (torch 1.x to 2.13)."""
    if not dist.is_initialized():
        return None
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    if get is None:
        raise _missing("torch.distributed.distributed_c10d._get_default_store")
    return get()


def set_default_group_timeout(seconds: float) -> None:
    """Change the default process group's collective timeout after it was created.
    Private: `distributed_c10d._set_pg_timeout` (torch 2.2 to 2.13)."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        raise _missing("torch.distributed.distributed_c10d._set_pg_timeout")
    setter(timedelta(seconds=seconds))


def set_every_group_timeout(seconds: float) -> None:
    """The collective timeout of every process group this process has made (the default one, and the mesh's,
    the pipeline's and the tied pairs' groups, whose own default is 30 minutes). Private:
    `distributed_c10d._world.pg_map` and `_set_pg_timeout(timeout, group)` (torch 2.2 to 2.13)."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    world = getattr(dist.distributed_c10d, "_world", None)
    if setter is None or world is None or not hasattr(world, "pg_map"):
        raise _missing("torch.distributed.distributed_c10d._world.pg_map / _set_pg_timeout")
    for group in list(world.pg_map):
        setter(timedelta(seconds=seconds), group)


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous buffer holding `tensors` (for one all-reduce instead of many).
    Private: `torch._utils._flatten_dense_tensors` (stable since torch 1.0)."""
    return torch._utils._flatten_dense_tensors(tensors)


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` shaped like `like` (the inverse of flatten)."""
    return torch._utils._unflatten_dense_tensors(flat, like)


def pipeline_p2p_hooks():
    """(module, batch_p2p, wait_batch_p2p) of torch.distributed.pipelining's schedules, whose sends and
    receives the pipeline recipe times; None where this torch lacks them (the waits then go unrecorded).
    Private: `schedules._batch_p2p` / `_wait_batch_p2p` (torch 2.5 to 2.13)."""
    from torch.distributed.pipelining import schedules

    post, wait = getattr(schedules, "_batch_p2p", None), getattr(schedules, "_wait_batch_p2p", None)
    if post is None or wait is None:
        return None
    return schedules, post, wait


def skip_deepspeed_shm_comm() -> bool:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce (`deepspeed_shm_comm`, about
    40 s of C++ build in a fresh environment) when it sets up its communication backend: only
    `inference_all_reduce` uses that op, and ZeRO training reduces through torch.distributed. Private:
    `deepspeed.ops.__compatible_ops__`, the probe table DeepSpeed consults before building (0.15 to 0.19).
    Returns False where the table is missing (DeepSpeed then builds the op as it would anyway)."""
    import deepspeed.ops

    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    if not isinstance(table, dict):
        return False
    table["deepspeed_shm_comm"] = False
    return True


def collective_counter(range_factory=None):
    """A dispatch mode that counts the functional collectives DTensor issues (what tensor parallelism
    communicates) and their payload bytes; enter it around a training step. With `range_factory`
    (profiling.range), each collective's issue runs in a range "tp.<collective>" and each wait for one in
    "tp.wait", so Nsight and the timeline show TP communication, which DTensor issues from inside its ops.
    Private: `torch.utils._python_dispatch.TorchDispatchMode`, the `_c10d_functional` op namespace and
    `_functional_collectives.AsyncCollectiveTensor` (torch 2.4 to 2.13), what torch's CommDebugMode uses."""
    import contextlib

    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    if not hasattr(torch.ops._c10d_functional, "all_reduce"):
        raise _missing("torch.ops._c10d_functional (DTensor's functional collectives)")

    class CollectiveCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: dict[str, int] = {}
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(issubclass(t, DTensor) for t in types):
                return NotImplemented   # let DTensor turn the op into local ops and collectives first
            name = func._overloadpacket.__name__ if getattr(func, "namespace", None) == "_c10d_functional" else None
            span = contextlib.nullcontext()
            if name and not name.startswith("_") and name != "wait_tensor":   # not waits, not autograd wrappers
                nbytes = sum(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor))
                self.ops[name] = self.ops.get(name, 0) + 1
                self.bytes += nbytes
                span = range_factory(f"tp.{name}", bytes=nbytes) if range_factory else span
            elif range_factory and (name == "wait_tensor" or any(issubclass(t, AsyncCollectiveTensor) for t in types)):
                span = range_factory("tp.wait")   # the first op on an async result waits for its collective
            with span:
                return func(*args, **(kwargs or {}))

    return CollectiveCounter()


def dcp_async_save():
    """torch.distributed.checkpoint.async_save: stage to host memory, write in a background thread; returns a
    Future (torch 2.11 to 2.13; newer releases may return an AsyncSaveResponse, whose upload_completion is
    the Future: see async_write_future). Public but marked experimental by torch."""
    import torch.distributed.checkpoint as dcp

    saver = getattr(dcp, "async_save", None)
    if saver is None:
        raise _missing("torch.distributed.checkpoint.async_save (checkpoint.async_save = true)")
    return saver


def async_write_future(response):
    """The Future that completes when async_save's background write has finished, whatever it returned."""
    return getattr(response, "upload_completion", response)


def fake_process_group(rank: int, world_size: int) -> None:
    """Start torch's fake process group: rank `rank` of `world_size` in this one process, every collective a
    no-op that returns at once (a dry run lays a model out on it, parallel/tools/dry_run.py). Private:
    `torch.testing._internal.distributed.fake_pg.FakeStore` and the "fake" backend it registers (torch 2.1
    to 2.13)."""
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:
        raise _missing("torch.testing._internal.distributed.fake_pg (the fake process group)") from e
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def storage_key(t: torch.Tensor) -> int:
    """An identity of the storage behind `t` that also tells meta tensors apart (their data_ptr is 0 for all):
    the address of its StorageImpl. Private: `UntypedStorage._cdata` (torch 1.x to 2.13)."""
    storage = t.untyped_storage()
    return storage._cdata if t.device.type == "meta" else storage.data_ptr()

def local_block(t: torch.Tensor) -> tuple[slice, ...]:
    """The block of the global tensor that this rank's part of `t` is (one slice per dimension): the whole
    tensor for a plain one, the local shard's rows/columns for a DTensor (FSDP2, TP, both).
    Private: `torch.distributed.tensor._utils.compute_local_shape_and_global_offset` (torch 2.4 to 2.13)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return tuple(slice(0, n) for n in t.shape)
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        raise _missing("torch.distributed.tensor._utils.compute_local_shape_and_global_offset") from None
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def ddp_ignore(module: torch.nn.Module, names: list[str]) -> None:
    """DistributedDataParallel leaves the parameters `names` alone (expert parallelism reduces them itself);
    a private torch API."""
    from torch.nn.parallel import DistributedDataParallel

    fn = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if fn is None:
        raise _missing("DistributedDataParallel._set_params_and_buffers_to_ignore_for_model")
    fn(module, names)


def all_to_all_autograd(out: torch.Tensor, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    """all_to_all_single with a backward (expert parallelism's dispatch and combine), through c10d's blocking
    op: torch.distributed.nn.functional's, deprecated (FutureWarning) in favour of the functional collectives,
    which the tp collective counter (collective_counter) would count as tensor parallelism's."""
    import warnings

    from torch.distributed.nn import functional

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return functional.all_to_all_single(out, x, out_splits, in_splits, group=group)


def settled(t):
    """`t` with a pending functional collective waited on, in autograd: DTensor.to_local() may hand out an
    AsyncCollectiveTensor (tensor parallelism's embedding output), which a torch.compile'd region takes as a
    subclass input and returns a plain gradient for, which the DTensor redistribution behind it refuses in
    backward (torch 2.11-2.13). A copy outside the graph is a plain tensor. Anything else passes as it is."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return t.clone() if isinstance(t, AsyncCollectiveTensor) else t
