"""A config as dotted keys: `{"optim": {"lr": 1}}` -> `{"optim.lr": 1}`, and what differs between two. Plain
dicts only, so the run directory (runtime/rundir.py) and the fingerprint (checkpoint/) share it without
importing the config's schema."""

from __future__ import annotations

from typing import Any


def flatten_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: a config's values under their dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
    """{key: [old, new]} for every config value that differs (a run's next segment)."""
    a, b = flatten_config(old), flatten_config(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
