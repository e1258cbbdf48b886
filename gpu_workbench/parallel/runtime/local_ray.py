"""The Ray that `wb` starts in its own process when given no cluster address (Ray Train's launcher, the
async-ps recipe, their tests): loopback only, no dashboard, and its workers at the caller's priority.

Ray's raylet starts every worker process at nice 15 (its `worker_niceness` setting): right for a shared
cluster's helpers, wrong here, where those workers are the training job itself. On a busy machine nice-15
workers starve: on a 2-core box beside two busy processes, Ray Train's controller actor had not finished
starting after two minutes. A cluster someone else started keeps its own setting; `ray start` reads
`RAY_worker_niceness=0` from its environment (scripts/netns_hosts.sh and tests/cluster/test_ray.py set it).
"""

from __future__ import annotations

WORKER_NICENESS = {"worker_niceness": 0}   # the raylet's setting; its environment form is RAY_worker_niceness


def start_local_ray(num_cpus: int, **init_kwargs) -> None:
    """`ray.init` of a new one-node Ray on 127.0.0.1 whose workers run at the caller's priority."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             _system_config=WORKER_NICENESS, **init_kwargs)
