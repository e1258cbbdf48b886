"""Run under torchrun by tests/parallel/primitives/test_tensor_parallel.py: trains the runs of its first argument (as
tests/helpers/runs.py does; a `["copy", src, dst, step]` item seeds dst with src's checkpoint, as in
tests/helpers/workers/pipeline_runs.py, so that the next run resumes from it) and then, in the same launch,
checks the tensor-parallel model alone against the unsharded one (the nanotron pattern), writing what it
found to the JSON file of its second argument.

The unit check, for sequence parallelism off and on: one forward and backward of the same batch through a
TP GPT and through an unsharded copy with the same initial weights; the loss, every gathered gradient, and
whether each replicated gradient is bitwise equal on every TP rank.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def _gathered_equal(t: torch.Tensor) -> bool:
    """t is bitwise the same on every rank of the default group."""
    copies = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, t.contiguous())
    return all(torch.equal(c, copies[0]) for c in copies)


def unit_check(sp: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from gpu_workbench.parallel import RunConfig, models
    from gpu_workbench.parallel.models.transformer import GPT
    from gpu_workbench.parallel.primitives import tensor_parallel

    cfg = RunConfig.from_toml(None, ["model.n_layers=2", "model.d_model=32", "model.seq_len=8", "model.vocab_size=32",
                                     "model.n_heads=4", "model.tie_embeddings=true"]).model
    torch.manual_seed(1)
    ref, tp = GPT(cfg), GPT(cfg)
    tp.load_state_dict(ref.state_dict())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    tensor_parallel.apply(tp, mesh, sp, models.get(cfg.arch))
    x, y = (torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(s))
            for s in (2, 3))
    ref_loss = ref(x, y)
    ref_loss.backward()
    with loss_parallel():
        loss = tp(x, y)
        loss.backward()
    tensor_parallel.reduce_partial_grads(tp)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    out = {"loss": float(loss.full_tensor()), "ref_loss": float(ref_loss), "grad_rel": {}, "replicated_equal": {}}
    for name, p in tp.named_parameters():
        g = p.grad
        full = g.full_tensor() if isinstance(g, DTensor) else g
        out["grad_rel"][name] = float((full - ref_grads[name]).norm() / ref_grads[name].norm())
        if not isinstance(g, DTensor) or all(pl.is_replicate() for pl in g.placements):
            out["replicated_equal"][name] = _gathered_equal(g.to_local() if isinstance(g, DTensor) else g)
    return out


if __name__ == "__main__":
    from gpu_workbench.parallel import RunConfig, train
    from gpu_workbench.parallel.runtime.distributed import exit_worker

    for item in json.loads(sys.argv[1]):
        if item[0] == "copy":   # ["copy", src, dst, step]: dst holds only src's checkpoint after `step` steps
            from tests.helpers.workers.pipeline_runs import _copy_checkpoint

            _copy_checkpoint(*item[1:])
        else:
            train(RunConfig.from_toml(item[0], item[1]))
    if len(sys.argv) > 2:
        results = {f"sp={sp}": unit_check(sp) for sp in (False, True)}
        if dist.get_rank() == 0:
            with open(sys.argv[2], "w") as f:
                json.dump(results, f)
    exit_worker(0)
