"""What must match for a checkpoint to resume, and what may change between a run's segments.

A checkpoint's meta.json records `fingerprint(cfg, world_size)`. Resuming compares it with the new
run's before anything in the run directory is written, and refuses a mismatch in one line naming the
first differing field. Everything else (steps, logging, profiling, checkpoint cadence, faults, the
learning rate) may change: `config.json` records what did, segment by segment.

Two kinds of field: STATE (what the saved tensors and the data stream are: never changes) and LAYOUT
(how the state is sharded over ranks). A checkpoint in the universal format (universal.py), read by a
recipe that speaks it, may change its LAYOUT: it is resharded. Taking the weights alone
(checkpoint.load_model_only) needs only the model's shape to match.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from gpu_workbench.parallel.runtime.flat_config import flatten_config

# the state's shapes and the data stream
STATE = ("model", "data", "seed", "global_batch", "precision")
# the layout the state is sharded by
LAYOUT = ("recipe", "world_size", "pp.degree", "pp.virtual_stages", "pp.layers_per_stage", "zero.stage", "tp", "cp")
MUST_MATCH = STATE + LAYOUT


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in prefixes)


def fingerprint(cfg, world_size: int) -> dict[str, Any]:
    flat = flatten_config(asdict(cfg))
    flat["world_size"] = world_size
    return {k: v for k, v in flat.items() if _under(k, MUST_MATCH)}


def first_difference(saved: dict[str, Any], current: dict[str, Any], only: tuple[str, ...] = MUST_MATCH) -> str | None:
    """'model.d_model is 32 in this run, 64 in the checkpoint', or None when they agree on every field
    under `only` (STATE: a resharding resume; ("model",): the weights alone)."""
    for key in sorted(set(saved) | set(current)):
        if _under(key, only) and key in saved and saved.get(key) != current.get(key):
            return f"{key} is {current.get(key)!r} in this run, {saved[key]!r} in the checkpoint"
    return None
