"""parallel/runtime/compat.py: every private torch API the project uses exists on this torch and does its job."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from gpu_workbench.parallel.runtime import compat


def test_this_torch_is_in_the_supported_range():
    low, high = (tuple(int(x) for x in v.split(".")) for v in compat.SUPPORTED_TORCH)
    assert low <= compat.torch_version() <= high, (torch.__version__, compat.SUPPORTED_TORCH)


def test_flatten_round_trips():
    tensors = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 2, 2)]
    flat = compat.flatten(tensors)
    assert flat.shape == (15 + 7 + 8,)
    for a, b in zip(tensors, compat.unflatten(flat * 2, tensors), strict=True):
        torch.testing.assert_close(b, a * 2)


def test_pipeline_p2p_hooks_exist():
    hooks = compat.pipeline_p2p_hooks()
    assert hooks is not None, "torch.distributed.pipelining.schedules lost _batch_p2p / _wait_batch_p2p"
    module, post, wait = hooks
    assert callable(post) and callable(wait)


def test_store_and_timeout_helpers_on_a_real_group():
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        store = compat.default_store()
        store.set("wb/compat", "1")
        assert store.get("wb/compat") == b"1"
        compat.set_default_group_timeout(123.0)   # raises where the private setter is gone
        dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
    if started:
        assert compat.default_store() is None   # no group, no store


def test_a_missing_private_api_names_torch(monkeypatch):
    monkeypatch.delattr(dist.distributed_c10d, "_set_pg_timeout")
    with pytest.raises(RuntimeError, match=r"torch .* lacks torch\.distributed\.distributed_c10d\._set_pg_timeout"):
        compat.set_default_group_timeout(1.0)


def test_deepspeed_shm_comm_build_is_skipped():
    """The ZeRO recipes on CPU mark DeepSpeed's inference-only shm op incompatible, so its communication
    backend neither builds nor loads it."""
    pytest.importorskip("deepspeed")
    import importlib

    import deepspeed.ops

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")   # `deepspeed.comm.torch` the attribute is torch

    assert compat.skip_deepspeed_shm_comm()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert ds_torch_comm.build_shm_op() is None


def test_collective_counter_counts_functional_collectives():
    """What tensor parallelism's measured collectives rest on: a functional all-reduce of 3 x 4 fp32 is
    counted once with its 48 bytes; a plain tensor op is not counted."""
    import torch.distributed._functional_collectives as funcol

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with compat.collective_counter() as counter:
            out = funcol.all_reduce(torch.ones(3, 4), "sum", dist.group.WORLD)
            (out * 2).sum()
        assert counter.ops == {"all_reduce": 1} and counter.bytes == 48, (counter.ops, counter.bytes)
    finally:
        if started:
            dist.destroy_process_group()


def test_collective_counter_puts_each_collective_and_its_wait_in_a_range(tmp_path):
    """With a range factory (what TP engines pass while a profiler or the timeline listens), the issue of a
    functional collective is a "tp.<name>" span carrying its bytes, and the wait for it a "tp.wait" span."""
    import json

    import torch.distributed._functional_collectives as funcol

    from gpu_workbench.profiling import listening, timeline
    from gpu_workbench.profiling import range as prange

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    timeline.start(tmp_path)
    try:
        assert listening()
        with compat.collective_counter(prange):
            out = funcol.all_reduce(torch.ones(3, 4), "sum", dist.group.WORLD)
            (out * 2).sum()   # uses the result: waits for the collective
        spans = json.loads(timeline.write().read_text())["spans"]
    finally:
        timeline.stop()
        if started:
            dist.destroy_process_group()
    names = [s["name"] for s in spans]
    assert names.count("tp.all_reduce") == 1 and "tp.wait" in names, names
    assert next(s for s in spans if s["name"] == "tp.all_reduce")["args"] == {"bytes": 48}
    assert not listening()


def test_dcp_async_save_stages_then_writes_in_the_background(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.randn(5, 3, dtype=torch.float64)}
    want = state["w"].clone()
    with warnings.catch_warnings():   # DCP's "torch.distributed is disabled": one process is the intent
        warnings.simplefilter("ignore")
        response = compat.dcp_async_save()(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
        state["w"].add_(1.0)   # staged before async_save returned: the write holds the old values
        compat.async_write_future(response).result()
        back = {"w": torch.empty(5, 3, dtype=torch.float64)}
        dcp.load(back, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert torch.equal(back["w"], want)


def test_fake_process_group_builds_a_big_mesh_in_this_process():
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized()
    compat.fake_process_group(rank=37, world_size=128)
    try:
        mesh = init_device_mesh("cpu", (8, 4, 4), mesh_dim_names=("dp", "cp", "tp"))
        assert dist.get_rank() == 37 and dist.get_world_size() == 128
        assert mesh["tp"].size() == 4 and list(mesh.get_coordinate()) == [2, 1, 1]
        compat.set_every_group_timeout(5.0)   # every group the mesh made, without error
    finally:
        dist.destroy_process_group()


def test_storage_key_tells_meta_storages_apart_and_views_together():
    a, b = torch.empty(4, device="meta"), torch.empty(4, device="meta")
    assert compat.storage_key(a) != compat.storage_key(b)
    assert compat.storage_key(a) == compat.storage_key(a[1:])
    c = torch.zeros(3)
    assert compat.storage_key(c) == c.untyped_storage().data_ptr() == compat.storage_key(c[1:])

def test_local_block_names_a_shard_of_the_global_tensor():
    """A plain tensor is its whole block; a DTensor's block is where its local shard sits (hf: loading)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    assert compat.local_block(torch.zeros(3, 5)) == (slice(0, 3), slice(0, 5))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        t = distribute_tensor(torch.arange(15.0).reshape(3, 5), mesh, [Shard(1)])
        assert compat.local_block(t) == (slice(0, 3), slice(0, 5))
    finally:
        if started:
            dist.destroy_process_group()


def test_ddp_ignore_marks_the_named_parameters():
    """Expert parallelism's experts stay out of DistributedDataParallel's buckets (the EP test runs it for real)."""
    model = torch.nn.Linear(2, 2)
    compat.ddp_ignore(model, ["weight"])
    assert model._ddp_params_and_buffers_to_ignore == ["weight"]
