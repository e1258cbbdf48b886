"""The dry run of an expert-parallel layout (fake process group, meta device, in this process): one step's
collectives list the tokens' all-to-alls (the dropless formula) and the experts' own fsdp units over the ranks
holding the same experts (the blocks' units leave them out)."""

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.primitives.expert_parallel import predicted_step_bytes
from gpu_workbench.parallel.tools.dry_run import dry_run
from tests.helpers.runs import TINY


def test_fsdp_ep_dry_run_lists_the_all_to_all_and_the_experts_units():
    cfg = RunConfig.from_toml(TINY, ["recipe=fsdp", "model.arch=llama", "model.moe.experts=8", "ep.degree=2",
                                     "global_batch=32"])
    result = dry_run(cfg, world_size=8)
    ops = {op["op"] + " " + op["group"]: op for op in result.collectives[0]["ops"]}
    a2a = ops["all_to_all ep"]
    assert a2a["group_size"] == 2 and a2a["count"] * a2a["bytes"] == predicted_step_bytes(cfg, 2, 8)
    experts_bytes = 2 * 3 * 8 * 64 * 176 * 4 // 2   # 2 MoE layers, 3 matrices of 8 experts (C 64, F 176), 1/ep
    for op in ("all_gather dp_mod_ep", "reduce_scatter dp_mod_ep"):   # every MoE layer's unit, gathered
        assert ops[op]["group_size"] == 4 and ops[op]["bytes"] == experts_bytes // 2, ops[op]
    gathered = [op for op in result.collectives[0]["ops"]
                if "fsdp unit blocks" in op["what"] and op["op"] == "all_gather"]
    assert all(op["bytes"] < experts_bytes // 2 for op in gathered)   # the experts are not fsdp's
