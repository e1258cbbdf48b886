"""Collective timeouts and their diagnosis, and a process group that survives a torchrun restart.

- `fault.collective_timeout_s`: the process group's timeout inside the training loop (set after setup,
  so a slow start-up does not trip it). A collective that times out raises `CollectiveTimeout` naming
  the ranks that never reached this step, read from per-rank heartbeats in the c10d store.
Injected kills, hangs and stragglers: parallel/runtime/injector.py.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from gpu_workbench.parallel.runtime import compat
from gpu_workbench.parallel.runtime.injector import MARKER

_KEY = "wb/heartbeat/{}"


class CollectiveTimeout(TimeoutError):
    """A collective did not complete within fault.collective_timeout_s (a hung or lost rank)."""


class RankLost(RuntimeError):
    """A peer rank died mid-collective (its connection closed): one line instead of gloo's traceback."""


_PEER_GONE = r"connection closed by peer|connection reset by peer|broken pipe|connection refused"


def _store():
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    try:
        return compat.default_store()
    except Exception:   # noqa: BLE001 - diagnosis is best effort
        return None


def restart_safe_store() -> dict:
    """`init_process_group` arguments that keep each torchrun attempt's gloo addresses apart.

    Seen with torch 2.13: after `--max-restarts` restarts the group, the agent's TCPStore still holds
    the previous attempt's gloo addresses under the same keys, and the new ranks connect to the dead
    ones ("Gloo connectFullMesh failed ... Connection refused"). A key prefix per attempt fixes it.
    The attempt is counted in that store (every rank adds 1 as it starts), not read from
    TORCHELASTIC_RESTART_COUNT: with several nodes, an agent that restarts because another node's rank
    failed keeps its count, so the nodes' counts differ and their ranks would wait under different
    prefixes (docs/ARCHITECTURE.md, Slurm test cluster: two hosts)."""
    if "MASTER_ADDR" not in os.environ or "TORCHELASTIC_RUN_ID" not in os.environ:
        return {}
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not agent_store and attempt == 0:
        return {}   # rank 0 hosts a fresh store each attempt: nothing stale in it
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timedelta(minutes=10))
    if agent_store:   # the job's store, kept across attempts: the same count on every node
        attempt = (store.add("wb/ranks_started", 1) - 1) // world
    return {"store": dist.PrefixStore(f"wb/attempt_{attempt}", store), "rank": rank, "world_size": world}


def arm(cfg) -> None:
    """Apply the loop's collective timeout to the default process group."""
    if dist.is_initialized():
        compat.set_default_group_timeout(cfg.fault.collective_timeout_s)


def heartbeat(rank: int, step: int) -> None:
    """Record that `rank` started `step` (read back by explain_timeout)."""
    store = _store()
    if store is not None:
        try:
            store.set(_KEY.format(rank), str(step))
        except Exception:   # noqa: BLE001 - diagnosis is best effort
            pass


def is_timeout(error: BaseException) -> bool:
    return bool(re.search(r"timed out|timeout", str(error), re.IGNORECASE))


def explain_peer_loss(error: BaseException, rank: int, step: int) -> RankLost | None:
    """The one-line error for a collective whose peer is gone, or None if `error` is something else."""
    if not re.search(_PEER_GONE, str(error), re.IGNORECASE):
        return None
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
    after = (f"torchrun restarts the group if restarts are left (--max-restarts {restarts})" if restarts
             else "the job stops")
    return RankLost(f"rank {rank}: a peer rank was lost during step {step} ({str(error).splitlines()[0][:120]}); "
                    f"{after}")


def restart_note(run_dir) -> str | None:
    """'restart 1 of 1 after rank 1 killed at step 3' on a torchrun restart (None on a first attempt)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return None
    marker = Path(run_dir) / MARKER
    why = f" after {marker.read_text().strip()}" if marker.is_file() else " after a lost rank"
    return f"restart {attempt} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}{why}"


def explain_timeout(error: BaseException, cfg, rank: int, step: int) -> CollectiveTimeout:
    """The error to raise for a timed-out collective: which ranks never reached `step`."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    store, behind = _store(), []
    if store is not None:
        for r in range(world):
            key = _KEY.format(r)
            try:
                seen = int(store.get(key)) if store.check([key]) else -1
            except Exception:   # noqa: BLE001
                continue
            if seen < step:
                behind.append(f"rank {r} (last at step {seen})" if seen >= 0 else f"rank {r} (never started a step)")
    who = ", ".join(behind) if behind else "an unknown rank"
    return CollectiveTimeout(f"collective timed out after {cfg.fault.collective_timeout_s:g}s in step {step} on rank "
                             f"{rank}: {who} did not reach step {step} (hung or lost). First error: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")
