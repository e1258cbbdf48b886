"""A parameter-server shard: owns a slice of the parameters and their AdamW state, applies gradients.

`ParamShard` is a plain class; `ray.remote(ParamShard)` makes it an *async* actor (its methods are
coroutines), so a pull that must wait at the staleness bound parks on an asyncio.Condition while
pushes from other workers keep flowing through the same actor.

Clocks and staleness (SSP, Ho et al. 2013). Worker w's clock is the number of its gradients this shard
has acknowledged (`acked[w]`). A worker may pull for clock c only when c - min(acked over live workers)
<= staleness: it runs at most `staleness` clocks ahead of the slowest. The staleness recorded for a
gradient is exactly that lead at the moment it read the parameters; `version_lag` is how many updates
the server applied between that read and this gradient's apply.

- staleness > 0 (async): every push is its own AdamW update, applied on arrival (the worker clipped it).
- staleness = 0 (sync, BSP): a round's gradients wait until every live worker pushed, then their mean is
  clipped by its global norm (summed over shards: see `round_sq` / `apply`) and applied as one update,
  which is exactly ddp's step on the same global batch.

An acknowledged push is never lost: it is applied (async) or held in its round (sync) before the
push returns; a replacement worker resumes at its predecessor's acknowledged clock, and a repeated push
of an acknowledged clock (a worker that died half-way through pushing to the shards) is ignored.
"""

from __future__ import annotations

import asyncio
import time

import torch

from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.models.transformer import build
from gpu_workbench.parallel.recipes.base import lr_lambda


def shard_names(model: torch.nn.Module, shards: int) -> list[list[str]]:
    """Parameter names per shard: largest first onto the lightest shard (balanced by element count)."""
    named = sorted(model.named_parameters(), key=lambda kv: (-kv[1].numel(), kv[0]))
    out, load = [[] for _ in range(shards)], [0] * shards
    for name, p in named:
        k = load.index(min(load))
        out[k].append(name)
        load[k] += p.numel()
    return out


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def flat_views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` shaped like `params`, in order (a shard's tensors travel as one flat tensor)."""
    out, offset = [], 0
    for p in params:
        out.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


class ParamShard:
    def __init__(self, cfg_dict: dict, shard: int, shards: int, n_workers: int):
        torch.set_num_threads(1)
        cfg = self.cfg = RunConfig.from_dict(cfg_dict)
        torch.manual_seed(cfg.seed)               # the same initial weights as every other recipe
        model = build(cfg.model)
        named = dict(model.named_parameters())
        self.names = shard_names(model, shards)[shard]
        # the shard's parameters are views of one flat tensor: a pull sends it whole, a push one flat gradient
        self.flat = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        self.params = {n: torch.nn.Parameter(v) for n, v in zip(self.names, flat_views(
            self.flat, [named[n] for n in self.names]), strict=True)}
        o = cfg.optim
        decay = [p for p in self.params.values() if p.ndim >= 2]
        no_decay = [p for p in self.params.values() if p.ndim < 2]
        self.sync = cfg.ps.staleness == 0
        # sync: ddp's per-tensor arithmetic exactly (foreach=False); async: the faster multi-tensor kernels
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=not self.sync)
        self.n_workers = n_workers
        # The schedule runs over samples: an async update carries 1/N of a global batch.
        per_update = 1.0 if self.sync else 1.0 / n_workers
        factor = lr_lambda(cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda u: factor(u * per_update))
        self.acked = dict.fromkeys(range(n_workers), 0)
        self.live = set(range(n_workers))
        self.version = 0
        self.rounds: dict[int, dict[int, tuple[dict, float]]] = {}   # sync: clock -> worker -> (grads, loss)
        self.round_mean: dict[int, tuple[dict, float, float]] = {}   # sync: clock -> (mean grads, sq, loss)
        self.records: list[dict] = []
        self.bytes_in = self.bytes_out = 0
        self.t_first_pull = None
        self._cond = None

    def cond(self) -> asyncio.Condition:
        if self._cond is None:   # created inside the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    def ready(self) -> bool:
        return True

    def _min_clock(self) -> int:
        return min((self.acked[w] for w in self.live), default=0)

    def _may_read(self, clock: int) -> bool:
        if self.sync:
            return self.version >= clock
        return clock - self._min_clock() <= self.cfg.ps.staleness

    async def pull(self, w: int, clock: int) -> tuple[int, int, torch.Tensor]:
        """Parameters for worker w's clock `clock`, once the staleness bound allows it: (version, lead, flat)."""
        async with self.cond():
            await self.cond().wait_for(lambda: self._may_read(clock))
            if self.t_first_pull is None:
                self.t_first_pull = time.time()
            lead = clock - self._min_clock() if not self.sync else 0
            out = self.flat.clone()
            self.bytes_out += nbytes([out])
            return self.version, lead, out

    async def push(self, w: int, clock: int, read_version: int, lead: int, grads: torch.Tensor,
                   loss: float, grad_norm: float) -> int:
        """Accept worker w's (flat) gradient for `clock`; returns the acknowledged clock count of w."""
        async with self.cond():
            if clock < self.acked[w] or w not in self.live:   # already acknowledged (a retried push)
                return self.acked[w]
            self.bytes_in += nbytes([grads])
            if self.sync:
                self.rounds.setdefault(clock, {})[w] = (grads, loss)
            else:
                lag = self.version - read_version
                applied = self._apply(grads, grad_norm, clip_sq=None)
                self._record(w, clock, lead, lag, loss, grad_norm, applied)
            self.acked[w] = clock + 1
            self.cond().notify_all()
            return self.acked[w]

    def _round_done(self, clock: int) -> bool:
        got = self.rounds.get(clock, {})
        return self.version > clock or (bool(got) and all(w in got for w in self.live))

    async def round_sq(self, clock: int) -> float:
        """Sync: this shard's squared L2 norm of round `clock`'s mean gradient, once every live worker pushed."""
        async with self.cond():
            await self.cond().wait_for(lambda: self._round_done(clock))
            if self.version > clock:
                return 0.0   # already applied; the caller's apply() is then a no-op
            if clock not in self.round_mean:
                got = self.rounds[clock]
                order = sorted(got)
                mean = torch.stack([got[w][0] for w in order]).sum(0) / len(order)
                sq = float(sum(g.double().pow(2).sum() for g in flat_views(mean, list(self.params.values()))))
                loss = sum(got[w][1] for w in order) / len(order)
                self.round_mean[clock] = (mean, sq, loss)
            return self.round_mean[clock][1]

    async def apply(self, clock: int, total_sq: float) -> int:
        """Sync: apply round `clock` (clipped by the global norm sqrt(total_sq)); idempotent."""
        async with self.cond():
            if self.version == clock and clock in self.round_mean:
                mean, _, loss = self.round_mean.pop(clock)
                self.rounds.pop(clock, None)
                norm = total_sq ** 0.5
                applied = self._apply(mean, norm, clip_sq=total_sq)
                self._record(-1, clock, 0, 0, loss, norm, applied)
                self.cond().notify_all()
            return self.version

    def _apply(self, grads: torch.Tensor, norm: float, clip_sq: float | None) -> bool:
        """One AdamW update; in sync mode clip by the global norm first, exactly as the torch recipes do."""
        lr_used = self.opt.param_groups[0]["lr"]
        self._lr = lr_used
        if not (norm == norm and norm != float("inf")):   # NaN/Inf: skip the step, as nan_policy = skip
            self.version += 1
            return False
        max_norm = self.cfg.optim.grad_clip
        coef = None
        if clip_sq is not None and max_norm > 0:
            coef = (max_norm / (torch.tensor(clip_sq, dtype=torch.float64).sqrt() + 1e-6)).clamp(max=1.0)
        grads = grads.to(self.flat.dtype)
        for p, g in zip(self.params.values(), flat_views(grads, list(self.params.values())), strict=True):
            if coef is not None:
                g = g * coef.to(g.dtype)
            p.grad = g
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.version += 1
        return True

    def _record(self, w: int, clock: int, lead: int, lag: int, loss: float, norm: float, applied: bool) -> None:
        self.records.append({"update": self.version - 1, "worker": w, "clock": clock, "staleness": lead,
                             "version_lag": lag, "loss": loss, "lr": self._lr, "grad_norm": norm,
                             "applied": applied, "t": time.time()})

    # ---- membership and read-out (driver) ----------------------------------------------------
    async def drop(self, w: int) -> None:
        async with self.cond():
            self.live.discard(w)
            self.cond().notify_all()

    def acked_clock(self, w: int) -> int:
        return self.acked[w]

    def report(self) -> dict:
        return {"version": self.version, "records": self.records, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "t_first_pull": self.t_first_pull, "acked": self.acked,
                "n_params": sum(p.numel() for p in self.params.values()),
                "state_bytes": nbytes(self.params.values()) + nbytes(
                    t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0)}

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}
