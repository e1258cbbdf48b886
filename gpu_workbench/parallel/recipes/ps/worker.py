"""A parameter-server worker: pull -> forward/backward on its data slice -> push, one clock at a time.

Worker w of N at clock c trains on slice w of global batch c (parallel.data's rank slice), cut into
micro-batches exactly as a ddp rank would: the union over workers of clock c is ddp's step c. In async
mode it clips its own gradient by its norm before pushing (each push is an update of its own); in sync
mode the server clips the round's mean. `ray.remote(PSWorker)` makes it an actor.
"""

from __future__ import annotations

import time

import torch

from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.data import Dataset, micro_batches
from gpu_workbench.parallel.models.transformer import build
from gpu_workbench.parallel.recipes.base import clip_grad_norm
from gpu_workbench.parallel.recipes.ps.server import flat_views, nbytes, shard_names
from gpu_workbench.parallel.runtime import memory
from gpu_workbench.parallel.runtime.injector import FaultInjector
from gpu_workbench.profiling import range as prange


class PSWorker:
    def __init__(self, cfg_dict: dict, w: int, n_workers: int, shards: list, restarted: bool = False):
        torch.set_num_threads(1)
        cfg = self.cfg = RunConfig.from_dict(cfg_dict)
        self.w, self.n, self.shards, self.restarted = w, n_workers, shards, restarted
        torch.manual_seed(cfg.seed)
        self.model = build(cfg.model)
        self.named = dict(self.model.named_parameters())
        self.layout = shard_names(self.model, len(shards))
        self.dataset = Dataset(cfg)
        self.sync = cfg.ps.staleness == 0
        self.faults = FaultInjector(cfg, w, replacement=restarted)   # a replacement is not killed again
        self.stats = {"worker": w, "compute_s": 0.0, "straggle_s": 0.0, "pull_s": 0.0, "push_s": 0.0,
                      "clocks": 0, "bytes_pulled": 0, "bytes_pushed": 0}

    def ready(self) -> bool:
        return True

    def _compute(self, clock: int) -> float:
        """Gradients of this worker's slice of global batch `clock` (sum of loss/accum over micro-batches)."""
        cfg = self.cfg
        for p in self.model.parameters():
            p.grad = None
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        mbs = micro_batches(cfg.global_batch, cfg.micro_batch, self.w, self.n)
        loss_sum = 0.0
        for j, indices in enumerate(mbs):
            x, y = self.dataset.batch(clock, indices)
            with prange("fwd", mb=j), autocast:
                loss = self.model(x, y)
            with prange("bwd", mb=j):
                (loss / len(mbs)).backward()
            loss_sum += float(loss.detach().double())
        return loss_sum / len(mbs)

    def _finish_round(self, clock: int) -> None:
        """Sync: sum the shards' squared norms of round `clock`'s mean gradient, then every shard applies it."""
        import ray

        total_sq = sum(ray.get([s.round_sq.remote(clock) for s in self.shards]))
        ray.get([s.apply.remote(clock, total_sq) for s in self.shards])

    def run(self, start: int, steps: int) -> dict:
        import ray

        cfg, st = self.cfg, self.stats
        if self.sync and start > 0:   # a replacement: make sure its predecessor's last round gets applied
            self._finish_round(start - 1)
        for clock in range(start, steps):
            self.faults.before_step(clock)   # an injected death: the driver sees the actor die
            t0 = time.perf_counter()
            with prange("pull", clock=clock):
                got = ray.get([s.pull.remote(self.w, clock) for s in self.shards])
            with torch.no_grad():
                for k, (_, _, flat) in enumerate(got):
                    mine = [self.named[n] for n in self.layout[k]]
                    for p, t in zip(mine, flat_views(flat, mine), strict=True):
                        p.copy_(t)
                    st["bytes_pulled"] += nbytes([flat])
            t1 = time.perf_counter()
            loss = self._compute(clock)
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = float(clip_grad_norm(params, cfg.optim.grad_clip, sharded=False)) if not self.sync else 0.0
            compute = time.perf_counter() - t1
            st["straggle_s"] += self.faults.straggle(compute)   # F x slower than its own compute
            t2 = time.perf_counter()
            with prange("push", clock=clock):
                refs = []
                for k, s in enumerate(self.shards):
                    version, lead, _ = got[k]
                    grads = torch.cat([self.named[n].grad.reshape(-1) for n in self.layout[k]])
                    st["bytes_pushed"] += nbytes([grads])
                    refs.append(s.push.remote(self.w, clock, version, lead, grads, loss, norm))
                ray.get(refs)
                if self.sync:
                    self._finish_round(clock)
            t3 = time.perf_counter()
            st["pull_s"] += t1 - t0
            st["compute_s"] += compute
            st["push_s"] += t3 - t2
            st["clocks"] += 1
        st["peak_memory_bytes"] = memory.peak_memory_bytes(torch.device("cpu"))
        st["state_bytes"] = nbytes(p for p in self.model.parameters()) + nbytes(
            p.grad for p in self.model.parameters() if p.grad is not None)
        return st
