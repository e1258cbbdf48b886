"""Parallel dimensions: how the world's ranks split into pipeline, data, context and tensor parallelism.

    dims = ParallelDims(world_size=8, pp=2, dp_replicate=1, dp_shard=2, cp=1, tp=2)
    mesh = dims.build_mesh("cpu")          # a DeviceMesh with the dimensions whose degree is > 1
    mesh["dp_shard"], dims.coords(rank=5)  # {"pp": 1, "dp_replicate": 0, "dp_shard": 0, "cp": 0, "tp": 1}

pp x dp_replicate x dp_shard x cp x tp = world size, checked when the object is made. The order is
the mesh's, outermost first: tensor parallelism varies fastest (neighbouring ranks, one node's fast
links), pipeline stages slowest (as torchtitan lays them out). Rank r's coordinate in a dimension is
(r // stride) % degree, the stride being the product of the degrees to its right. A recipe says which
data-parallel dimension gets the ranks that tp, cp and pp leave (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gpu_workbench.parallel.runtime.errors import UserError

ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# the config field each dimension comes from, for error messages
FIELD = {"pp": "pp.degree", "cp": "cp.degree", "tp": "tp.degree", "dp_replicate": "dp_replicate",
         "dp_shard": "dp_shard"}


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    # expert parallelism: E ranks borrowed from data parallelism (not a mesh dimension of its own: the E
    # consecutive data-parallel ranks of one tp coordinate, parallel/primitives/expert_parallel.py)
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ORDER:
            if getattr(self, name) < 1:
                raise UserError(f"{FIELD[name]} must be >= 1, got {getattr(self, name)}")
        if self.product != self.world_size:
            used = " x ".join(f"{FIELD[n]} {getattr(self, n)}" for n in ORDER if getattr(self, n) > 1) or "1"
            raise UserError(f"{used} = {self.product} does not equal world size (--nproc) {self.world_size}")
        if self.ep < 1 or self.dp % self.ep:
            raise UserError(f"ep.degree ({self.ep}) must divide the data-parallel ranks ({self.dp}): expert "
                            f"parallelism borrows its ranks from data parallelism")

    @classmethod
    def for_world(cls, world_size: int, data_parallel: str, pp: int = 1, cp: int = 1, tp: int = 1,
                  ep: int = 1) -> ParallelDims:
        """The dims where data parallelism (`replicate` or `shard`) takes every rank that pp, cp, tp leave."""
        model = pp * cp * tp
        if world_size % model:
            used = [f"{FIELD[n]} {d}" for n, d in (("pp", pp), ("cp", cp), ("tp", tp)) if d > 1]
            product = " x ".join(used) + (f" = {model}" if len(used) > 1 else "")
            raise UserError(f"{product} does not divide world size (--nproc) {world_size}")
        dp = world_size // model
        if data_parallel not in ("replicate", "shard"):
            raise ValueError(f"data_parallel must be 'replicate' or 'shard', got {data_parallel!r}")
        split = {"dp_replicate": dp} if data_parallel == "replicate" else {"dp_shard": dp}
        return cls(world_size=world_size, pp=pp, cp=cp, tp=tp, ep=ep, **split)

    @property
    def product(self) -> int:
        return math.prod(getattr(self, n) for n in ORDER)

    @property
    def dp(self) -> int:
        """Data-parallel degree: replicas x shards, the ranks a global batch is split over."""
        return self.dp_replicate * self.dp_shard

    def degrees(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in ORDER}

    def enabled(self) -> list[str]:
        return [n for n in ORDER if getattr(self, n) > 1]

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along every dimension (row-major over ORDER, tp fastest)."""
        out, stride = {}, 1
        for name in reversed(ORDER):
            out[name] = (rank // stride) % getattr(self, name)
            stride *= getattr(self, name)
        return {n: out[n] for n in ORDER}

    def groups(self, varying: tuple[str, ...]) -> list[list[int]]:
        """The ranks that differ in the `varying` dimensions alone, grouped (each group ascending): the
        members of each of the process groups that communicate along those dimensions."""
        members: dict[tuple, list[int]] = {}
        for r in range(self.world_size):
            fixed = tuple(v for n, v in self.coords(r).items() if n not in varying)
            members.setdefault(fixed, []).append(r)
        return list(members.values())

    def dp_rank(self, rank: int) -> int:
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def build_mesh(self, device_type: str, names: tuple[str, ...] | None = None):
        """A DeviceMesh over the named dimensions (default: those with degree > 1, else one 'dp' dim).
        Collective: every rank calls it. Dimensions left out must have degree 1."""
        from torch.distributed.device_mesh import init_device_mesh

        names = names or tuple(self.enabled()) or ("dp_replicate",)
        left_out = [n for n in ORDER if n not in names and getattr(self, n) > 1]
        if left_out:
            raise ValueError(f"build_mesh({names}) leaves out dimensions with degree > 1: {left_out}")
        shape = tuple(getattr(self, n) for n in ORDER if n in names)
        return init_device_mesh(device_type, shape, mesh_dim_names=tuple(n for n in ORDER if n in names))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
