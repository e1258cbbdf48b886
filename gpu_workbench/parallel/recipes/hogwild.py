"""`hogwild`: lock-free shared-memory SGD (Recht et al. 2011) with torch.multiprocessing, one node.

    wb train --recipe hogwild --nproc 4

The parameters live in shared memory (`model.share_memory()`); N = --nproc processes (forked) each
run `steps` updates on their own slice of each global batch (global_batch / N samples, the slice a
ddp rank would take) and write their AdamW update straight into the shared tensors, with no lock:
updates from different workers may interleave element by element. Each worker keeps its own gradient
buffers and its own AdamW moments (as PyTorch's Hogwild example keeps its own optimizer); the schedule
runs over samples, so the learning rate at a given sample count matches ddp's. Nothing crosses a
network: bytes communicated are 0. A worker that dies (`fault.kill_rank` injects one) stops the run
with an error. Model state per worker is measured in each worker at the end (the shared parameters,
its own gradients and AdamW moments).
"""

from __future__ import annotations

import os
import queue as queue_mod
import time

import torch
import torch.multiprocessing as mp

from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.data import Dataset, micro_batches
from gpu_workbench.parallel.models.transformer import build, count_params
from gpu_workbench.parallel.recipes.base import Recipe, clip_grad_norm, lr_lambda, param_groups
from gpu_workbench.parallel.recipes.ps.report import WorkerRun, write_run
from gpu_workbench.parallel.runtime import memory
from gpu_workbench.parallel.runtime.injector import FaultInjector
from gpu_workbench.parallel.runtime.rundir import RunDir, resolve_run_dir
from gpu_workbench.parallel.runtime.summary import AsyncStats, RunSummary


def _worker(w: int, n: int, cfg_dict: dict, model: torch.nn.Module, out, start) -> None:
    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(cfg_dict)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            foreach=False)
    factor = lr_lambda(cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: factor(u / n))   # one update = 1/N global batch
    dataset = Dataset(cfg)
    mbs = micro_batches(cfg.global_batch, cfg.micro_batch, w, n)
    params = list(model.parameters())
    faults = FaultInjector(cfg, w)
    start.wait()
    for step in range(cfg.steps):
        faults.before_step(step)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for indices in mbs:
            x, y = dataset.batch(step, indices)
            loss = model(x, y)
            (loss / len(mbs)).backward()
            loss_sum += float(loss.detach())
        norm = float(clip_grad_norm(params, o.grad_clip, sharded=False))
        lr = opt.param_groups[0]["lr"]
        applied = norm == norm and norm != float("inf")
        if applied:
            opt.step()   # straight into the shared parameters, no lock
        sched.step()
        faults.straggle(time.perf_counter() - t0)
        out.put({"worker": w, "clock": step, "loss": loss_sum / len(mbs), "lr": lr, "grad_norm": norm,
                 "applied": applied, "t": time.time()})
    held = {"params": params, "grads": [p.grad for p in params if p.grad is not None],
            "optimizer": [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]}
    out.put({"worker": w, "final": True, "state_bytes": memory.held_bytes(held)["total"]})


class Hogwild(Recipe):
    execution = "processes"
    checkpoint_modes = "its shared-memory workers write no checkpoints"
    timeline = ("its worker processes write into shared memory in place, with no communication a timeline "
                "could show; run it without --timeline")
    evaluation = "its shared-memory workers train outside the train loop that evaluates; run it with eval.every=0"
    tensor_parallel = "hogwild shares one whole model between processes; tensor parallelism needs spmd ranks"

    def run(self, cfg: RunConfig, nproc: int) -> RunSummary:
        return _run(cfg, nproc)


def start_method() -> str:
    """"fork" where there is one and a forked child can still run backward (no interpreter and torch start per
    worker), else "forkserver" (a fresh interpreter forks the workers), else "spawn". Once autograd has started
    its device threads in this process, a forked child's backward raises (the pytorch wiki's Autograd-and-Fork
    page): a CUDA build of torch does after a compiled backward, even with no GPU. A one-op child tells."""
    if "fork" not in mp.get_all_start_methods():
        return "spawn"
    probe = mp.get_context("fork").Process(target=_backward_once)
    probe.start()
    probe.join()
    return "fork" if probe.exitcode == 0 else "forkserver"


def _backward_once() -> None:
    """The probe's child: one tiny backward; exit 1, silently, where autograd refuses it."""
    try:
        (torch.ones(1, requires_grad=True) * 2).sum().backward()
    except RuntimeError:
        os._exit(1)
    os._exit(0)


def _run(cfg: RunConfig, nproc: int) -> RunSummary:
    run_dir = resolve_run_dir(cfg)
    out = RunDir(run_dir, active=True)
    out.write_config(cfg.to_dict())
    out.start_metrics(0)
    torch.manual_seed(cfg.seed)
    model = build(cfg.model)
    model.share_memory()
    ctx = mp.get_context(start_method())   # workers use one thread each
    results, start = ctx.Queue(), ctx.Barrier(nproc + 1)
    procs = [ctx.Process(target=_worker, args=(w, nproc, cfg.to_dict(), model, results, start), daemon=True)
             for w in range(nproc)]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.time()
    records, expected = [], nproc * (cfg.steps + 1)   # each worker: one record per step, then its final one
    try:
        while len(records) < expected:
            try:
                records.append(results.get(timeout=1.0))
            except queue_mod.Empty:
                dead = [w for w, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead or all(p.exitcode is not None for p in procs) and results.empty():
                    raise RuntimeError(f"hogwild: worker(s) {dead or 'all'} exited with "
                                       f"{[procs[w].exitcode for w in dead]} after {len(records)} of "
                                       f"{expected} updates") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    finals = [r for r in records if r.get("final")]
    records = sorted((r for r in records if not r.get("final")), key=lambda r: r["t"])
    if cfg.checkpoint.save_final:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, run_dir / "final_model.pt")
    n_params = count_params(model)
    run = WorkerRun(
        n_workers=nproc, records=records, t0=t0, samples_per_update=cfg.global_batch / nproc, bytes_total=0,
        n_params=n_params, model_state_bytes_per_rank=max(r["state_bytes"] for r in finals),
        predicted_model_state_bytes_per_rank=n_params * 16, predicted_formula="4Ψ shared + 4Ψ + 8Ψ per worker",
        peak_memory_bytes_per_rank=None)   # workers share one address space's pages: no per-worker figure
    stats = AsyncStats(workers=nproc, samples_per_update=run.samples_per_update,
                       tokens_per_s_per_update_median=None, shared_memory=True)
    return write_run(cfg, out, run, stats)
