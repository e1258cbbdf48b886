"""Ring attention against single-rank attention at growing sequence length, on the CPU (torch backend).
Run under torchrun with C ranks, by tests/bench/test_ring_attention_cpu.py or by hand (BENCHMARKS.md):

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m torch.distributed.run --standalone --nproc-per-node=2 \
        tests/bench/ring_attention_sweep.py results/ring_attention.json 1024,2048,4096,8192

Per length T (causal, headtail, B=1, 4 heads of 64, fp32), each rank one thread:
  ring     forward + backward of ring attention (parallel/primitives/context_parallel.py)
           over this rank's T/C positions;
  single   kernels.attention over all T on rank 0 alone (the others wait), the same random inputs.
Activation memory is measured, not predicted: the bytes autograd keeps for backward (every tensor
saved_tensors_hooks sees, each storage counted once), and the peak extra bytes of forward + backward from
torch.profiler's allocator events (kernels/suite/linear_cross_entropy.py: peak_extra_mb). Times are the
median of REPEATS, every rank starting each repeat together (a barrier); the ring's is the slowest rank's.
The ring output's relative error against single's is reported too. Rank 0 prints a table and writes JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

B, H, D, REPEATS = 1, 4, 64, 5


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """(fn's output, the bytes of the distinct storages autograd saved for its backward)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def measure(attn, q, k, v, do, group) -> dict:
    """ms (median over REPEATS, ranks of `group` in step), saved bytes and peak extra MB of forward + backward."""
    from gpu_workbench.kernels.suite.linear_cross_entropy import peak_extra_mb

    def step():
        q.grad = k.grad = v.grad = None
        out, held = saved_bytes(lambda: attn(q, k, v))
        out.backward(do)
        return out.detach(), held

    out, held = step()   # warm-up, and the memory held for backward
    times = []
    for _ in range(REPEATS):
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return {"out": out, "saved_bytes": held, "ms": statistics.median(times),
            "peak_extra_mb": peak_extra_mb(step, "cpu")}


def one_length(t: int) -> dict:
    from gpu_workbench import kernels
    from gpu_workbench.parallel.primitives import context_parallel as cp

    c, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(t)   # the same inputs on every rank
    q, k, v, do = (torch.randn(B, H, t, D, generator=gen) for _ in range(4))
    pos = cp.shard_positions(t, rank, c, "headtail")
    local = [x[:, :, pos].clone().requires_grad_() for x in (q, k, v)]
    ring = cp.Ring(dist.group.WORLD, "headtail", causal=True, backend="torch")
    got = measure(lambda a, b, e: cp.ring_attention(a, b, e, ring), *local, do[:, :, pos], dist.group.WORLD)
    ms = torch.tensor([got["ms"], got["saved_bytes"], got["peak_extra_mb"]], dtype=torch.float64)
    per_rank = [torch.zeros_like(ms) for _ in range(c)]
    dist.all_gather(per_rank, ms)
    row = {"seq_len": t, "cp": c, "ring_ms": max(float(r[0]) for r in per_rank),
           "ring_saved_bytes_per_rank": [int(r[1]) for r in per_rank],
           "ring_peak_extra_mb_per_rank": [float(r[2]) for r in per_rank]}
    if rank == 0:   # single-rank attention over the whole sequence, alone: the others wait at the barrier
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        single = measure(lambda a, b, e: kernels.attention(a, b, e, causal=True, backend="torch"), *full, do, None)
        row.update(single_ms=single["ms"], single_saved_bytes=single["saved_bytes"],
                   single_peak_extra_mb=single["peak_extra_mb"])
    dist.barrier()
    row["ring_out_rel_err"] = ring_error(got["out"], q, k, v, pos)
    return row


def ring_error(out: torch.Tensor, q, k, v, pos: torch.Tensor) -> float:
    """||ring - single|| / ||single|| over the whole sequence: each rank compares its rows with the full
    attention (recomputed here without autograd), the squares summed over the ranks."""
    from gpu_workbench import kernels
    with torch.no_grad():
        ref = kernels.attention(q, k, v, causal=True, backend="torch")[:, :, pos]
    err = torch.tensor([float((out - ref).double().pow(2).sum()), float(ref.double().pow(2).sum())],
                       dtype=torch.float64)
    dist.all_reduce(err)
    return float(err[0].sqrt() / err[1].sqrt())


def table(rows: list[dict]) -> str:
    lines = ["| T | single ms | ring ms | single saved MB | ring saved MB/rank | ratio | single peak MB "
             "| ring peak MB/rank | ratio | ring rel err |", "|" + "---|" * 10]
    for r in rows:
        ring_saved, ring_peak = max(r["ring_saved_bytes_per_rank"]), max(r["ring_peak_extra_mb_per_rank"])
        lines.append(f"| {r['seq_len']} | {r['single_ms']:.1f} | {r['ring_ms']:.1f} | "
                     f"{r['single_saved_bytes'] / 2**20:.2f} | {ring_saved / 2**20:.2f} | "
                     f"{ring_saved / r['single_saved_bytes']:.3f} | {r['single_peak_extra_mb']:.2f} | "
                     f"{ring_peak:.2f} | {ring_peak / r['single_peak_extra_mb']:.3f} | {r['ring_out_rel_err']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)   # one core per rank, and the same single thread for single-rank attention
    dist.init_process_group("gloo")
    rows = [one_length(int(t)) for t in sys.argv[2].split(",")]
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f)
        print(table(rows))
    dist.destroy_process_group()
