"""Run under torchrun by tests/parallel/primitives/test_context_parallel.py, with C = 2 or 3 ranks: first trains the
(config, overrides) runs of its optional second argument (JSON, as tests/helpers/runs.py does), then checks
ring attention over all C ranks against single-process kernels.attention, and a GPT with
context_parallel.apply against the same GPT unsharded; writes what it found to the JSON file of its first
argument (rank 0).

Each ring case: the same random q, k, v, dO on every rank; each rank takes its positions' rows, runs
ring attention forward and backward, and the squared errors of out, dq, dk, dv against the full
attention's (sliced the same way) are summed over the group into one relative error each. The block
counts and bytes sent are each rank's measured ContextParallelStats, with the analytic bytes beside them.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

# (name, B, Hq, Hkv, T, D, causal, load_balance, backend): odd head counts, GQA 6/2 and 3/1, both balances
RING_CASES = {
    2: [("torch-causal-headtail-H3", 2, 3, 3, 24, 16, True, "headtail", "torch"),
        ("torch-causal-none-H6/2", 1, 6, 2, 24, 16, True, "none", "torch"),
        ("torch-full-headtail-H6/2", 1, 6, 2, 24, 16, False, "headtail", "torch"),
        ("torch-full-none-H3/1", 2, 3, 1, 24, 16, False, "none", "torch"),
        ("interpret-causal-headtail-H6/2", 1, 6, 2, 12, 16, True, "headtail", "interpret"),
        ("interpret-full-none-H3", 1, 3, 3, 12, 16, False, "none", "interpret")],
    3: [("torch-causal-headtail-H3", 1, 3, 3, 18, 16, True, "headtail", "torch"),
        ("torch-causal-none-H6/2", 1, 6, 2, 18, 16, True, "none", "torch"),
        ("torch-full-headtail-H3/1", 1, 3, 1, 18, 16, False, "headtail", "torch"),
        ("interpret-causal-headtail-H6/2", 1, 6, 2, 12, 16, True, "headtail", "interpret")],
}


def _global_rel(pairs, group) -> list[float]:
    """||got - ref|| / ||ref|| over the whole sequence, each rank holding some rows of each pair."""
    sums = torch.tensor([[float((g.double() - r.double()).pow(2).sum()), float(r.double().pow(2).sum())]
                         for g, r in ((g.detach(), r.detach()) for g, r in pairs)],
                        dtype=torch.float64)
    dist.all_reduce(sums, group=group)
    return (sums[:, 0].sqrt() / sums[:, 1].sqrt()).tolist()


def ring_check(group, case) -> dict:
    from gpu_workbench import kernels
    from gpu_workbench.parallel.primitives import context_parallel as cp

    _, b, hq, hkv, t, d, causal, balance, backend = case
    c, rank = dist.get_world_size(group), dist.get_rank(group)
    gen = torch.Generator().manual_seed(1234 + t + hq)   # the same inputs on every rank
    q, do = (torch.randn(b, hq, t, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, hkv, t, d, generator=gen) for _ in range(2))
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = kernels.attention(*full, causal=causal, backend=backend)
    ref_grads = torch.autograd.grad(ref, full, do)
    pos = cp.shard_positions(t, rank, c, balance)
    local = [x[:, :, pos].clone().requires_grad_() for x in (q, k, v)]
    ring = cp.Ring(group, balance, causal=causal, backend=backend)
    out = cp.ring_attention(*local, ring)
    grads = torch.autograd.grad(out, local, do[:, :, pos])
    errs = _global_rel([(out, ref[:, :, pos])] + [(g, r[:, :, pos]) for g, r in zip(grads, ref_grads, strict=True)],
                       group)
    stats = [None] * c
    dist.all_gather_object(stats, ring.stats.to_dict(), group=group)
    return {"errors": dict(zip(("out", "dq", "dk", "dv"), errs, strict=True)), "stats": stats,
            "predicted_bytes": list(cp.predicted_bytes(local[1], c)), "local_len": len(pos)}


def model_check(group, balance: str) -> dict:
    """GPT loss and gradients with ring attention over the cp group vs the unsharded GPT: the loss averaged
    over the group (equal shards: the full mean), the gradients summed over it and divided by C."""
    from gpu_workbench.parallel import RunConfig
    from gpu_workbench.parallel.config import ContextParallelConfig
    from gpu_workbench.parallel.models.transformer import GPT
    from gpu_workbench.parallel.primitives import context_parallel as cp

    cfg = RunConfig.from_toml(None, ["model.n_layers=2", "model.d_model=32", "model.seq_len=12",
                                     "model.vocab_size=32", "model.n_heads=4"]).model
    c, rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(1)
    ref, model = GPT(cfg), GPT(cfg)
    model.load_state_dict(ref.state_dict())
    cp.apply(model, group, ContextParallelConfig(degree=c, load_balance=balance), backend="torch")
    x, y = (torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(s))
            for s in (2, 3))
    ref_loss = ref(x, y)
    ref_loss.backward()
    pos = cp.shard_positions(cfg.seq_len, rank, c, balance)
    loss = model(cp.shard_sequence(x, pos), cp.shard_sequence(y, pos), pos)
    (loss / c).backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g, group=group)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    rel = {n: float((g - ref_grads[n]).norm() / ref_grads[n].norm()) for n, g in grads.items()}
    return {"loss": float(total) / c, "ref_loss": float(ref_loss.detach()), "grad_rel": rel}


if __name__ == "__main__":
    from gpu_workbench.parallel import RunConfig, train
    from gpu_workbench.parallel.runtime.distributed import exit_worker

    for config, overrides in json.loads(sys.argv[2]) if len(sys.argv) > 2 else []:
        train(RunConfig.from_toml(config, overrides))   # initialises the process group on its first run
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    c, results = dist.get_world_size(), {}
    for case in RING_CASES.get(c, []):   # a 4-rank launch trains its runs only
        results[f"C{c}-{case[0]}"] = ring_check(dist.group.WORLD, case)
    for balance in ("headtail", "none") if c in RING_CASES else ():
        results[f"C{c}-model-{balance}"] = model_check(dist.group.WORLD, balance)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    exit_worker(0)
