"""ParallelDims: validated up front, coordinates as the mesh lays ranks out, and the mesh itself."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.recipes import RECIPES, resolve
from gpu_workbench.parallel.runtime.dims import ORDER, ParallelDims
from gpu_workbench.parallel.runtime.errors import UserError
from tests.helpers.runs import TINY


def test_product_must_equal_the_world_size():
    with pytest.raises(UserError, match=r"pp\.degree 2 x tp\.degree 2 = 4 does not equal world size \(--nproc\) 6"):
        ParallelDims(world_size=6, pp=2, tp=2)
    with pytest.raises(UserError, match=r"pp\.degree 3 x tp\.degree 2 = 6 does not divide world size \(--nproc\) 4"):
        ParallelDims.for_world(4, "replicate", pp=3, tp=2)
    with pytest.raises(UserError, match=r"tp\.degree must be >= 1"):
        ParallelDims(world_size=1, tp=0)


def test_data_parallelism_takes_the_remaining_ranks():
    d = ParallelDims.for_world(8, "shard", pp=2, tp=2)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp, d.dp) == (2, 1, 2, 2, 2)
    d = ParallelDims.for_world(6, "replicate", pp=3)
    assert (d.pp, d.dp_replicate, d.dp) == (3, 2, 2) and d.enabled() == ["pp", "dp_replicate"]


def test_coords_are_row_major_with_tp_fastest():
    d = ParallelDims(world_size=24, pp=2, dp_replicate=1, dp_shard=3, cp=2, tp=2)
    seen = set()
    for rank in range(24):
        c = d.coords(rank)
        # rebuild the rank from its coordinates by the documented strides
        rebuilt, stride = 0, 1
        for name in reversed(ORDER):
            rebuilt += c[name] * stride
            stride *= getattr(d, name)
        assert rebuilt == rank
        seen.add(tuple(c.values()))
    assert len(seen) == 24
    assert d.coords(1)["tp"] == 1 and d.coords(2)["cp"] == 1 and d.coords(12)["pp"] == 1


def test_recipes_map_onto_dims():
    ddp = resolve(RunConfig.from_toml(TINY, ["recipe=ddp"]), 4)
    fsdp = resolve(RunConfig.from_toml(TINY, ["recipe=fsdp"]), 4)
    pipe = resolve(RunConfig.from_toml(TINY, ["recipe=pipeline", "pp.degree=2", "model.n_layers=2"]), 4)
    assert (ddp.dp_replicate, ddp.dp_shard) == (4, 1) and (fsdp.dp_replicate, fsdp.dp_shard) == (1, 4)
    assert (pipe.pp, pipe.dp_replicate) == (2, 2)
    assert RECIPES["fsdp"].data_parallel == "shard" and RECIPES["ddp"].data_parallel == "replicate"


def test_tp_and_cp_are_accepted_and_cp_refused_by_recipes_without_it():
    cfg = RunConfig.from_toml(TINY, ["tp.degree=1", "cp.degree=1", "cp.load_balance=none"])
    assert cfg.tp.degree == 1 and cfg.cp.load_balance == "none"
    assert RunConfig.from_toml(TINY, ["tp.degree=2", "tp.sequence_parallel=true"]).tp.degree == 2
    assert resolve(RunConfig.from_toml(TINY, ["recipe=ddp", "cp.degree=2"]), 2).cp == 2
    with pytest.raises(UserError, match=r"cp\.degree = 2 does not work with recipe=single"):
        resolve(RunConfig.from_toml(TINY, ["cp.degree=2"]), 1)


def test_build_mesh_names_its_dimensions():
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = ParallelDims(world_size=1).build_mesh("cpu", ("dp_shard",))
        assert mesh.mesh_dim_names == ("dp_shard",) and mesh.size() == 1
        with pytest.raises(ValueError, match="leaves out"):
            ParallelDims(world_size=2, pp=2).build_mesh("cpu", ("dp_shard",))
    finally:
        if started:
            dist.destroy_process_group()
