"""`wb debug hang RUN_DIR`: the ranks' flight-recorder dumps (recorder.py) lined up, and the first operation
they disagree on, with the call sites, ending in a one-line verdict.

Each process group's entries line up by their sequence number. Walking the groups' sequences in order of
issue, the first place where the members differ is the answer:
  - a member that never issued #n while others did (a hung, dead or lagging rank: "never entered");
  - members that issued #n as different operations or sizes (a desync: ranks called collectives in
    different orders, or with different shapes);
  - every member issued #n but it never completed (a collective that itself hung, e.g. a network fault).
"""

from __future__ import annotations

import json
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.flight_recorder import FOLDER


def load(run_dir: Path) -> dict[int, dict]:
    folder = Path(run_dir) / FOLDER
    dumps = {}
    for path in sorted(folder.glob("rank*.json")) if folder.is_dir() else []:
        try:
            body = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        dumps[int(body["rank"])] = body
    for path in sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []:
        rank = int(path.stem.removeprefix("rank"))
        if rank not in dumps:   # the rank wrote no dump (it died inside a C++ library): its write-through log
            dumps[rank] = _from_log(path, rank, max((d["world_size"] for d in dumps.values()), default=1))
    if not dumps:
        raise UserError(f"{run_dir}: no flight-recorder dumps in {folder} (a run of the shared loop with "
                        f"fault.flight_records > 0 writes them on a timeout, an error or `wb debug dump`)")
    return dumps


def _from_log(path: Path, rank: int, world_size: int) -> dict:
    """A dump rebuilt from a write-through log: each entry, updated by the completions after it."""
    entries: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:   # a line cut short by the process's death
            continue
        key = (item["group"], item["seq"])
        entries[key] = {**entries.get(key, {}), **item}
    return {"rank": rank, "world_size": world_size, "pid": None, "dumped_at": path.stat().st_mtime, "step": None,
            "reason": "no dump (the process died without one): its write-through log", "entries": [
                e for e in entries.values() if "op" in e]}


def _label(e: dict) -> str:
    size = f"{e['bytes']} B" + (f" {e['dtype'].removeprefix('torch.')}" if e.get("dtype") else "")
    peer = f" {e['ranks'][0]}->{e['ranks'][1]}" if e.get("peer") is not None else ""
    return f"{e['op']} #{e['seq']}{peer} ({size}, step {e['step']})"


def _where(e: dict) -> str:
    via = e.get("torch_site") or ""
    return f"{e['site'] or '?'}" + (f" via {via}" if via else "")


def find(dumps: dict[int, dict]) -> dict:
    """The first disagreement: {"kind": "missing" | "desync" | "stuck" | "none", "entries": {rank: entry},
    "group": name, "seq": n, "members": [...]}."""
    by_group: dict[str, dict[int, dict[int, dict]]] = {}
    for rank, body in dumps.items():
        for e in body["entries"]:
            by_group.setdefault(e["group"], {}).setdefault(e["seq"], {})[rank] = e
    found = []
    for group, seqs in by_group.items():
        for seq in sorted(seqs):
            issued = seqs[seq]
            members = [r for r in next(iter(issued.values()))["ranks"] if r in dumps]
            oldest = min(min(e["seq"] for e in dumps[r]["entries"] if e["group"] == group) if any(
                e["group"] == group for e in dumps[r]["entries"]) else 0 for r in members)
            if seq < oldest:   # before a member's ring buffer begins: nothing to compare
                continue
            kind = _disagreement(issued, members)
            if kind:
                found.append({"kind": kind, "group": group, "seq": seq, "members": members, "entries": issued,
                              "at": min(e["issued_at"] for e in issued.values())})
                break
    if not found:
        return {"kind": "none"}
    return min(found, key=lambda f: f["at"])


def _disagreement(issued: dict[int, dict], members: list[int]) -> str | None:
    if any(r not in issued for r in members):
        return "missing"
    shapes = {("p2p" if e["op"] in ("send", "recv") else e["op"], e["bytes"]) for e in issued.values()}
    if len(shapes) > 1:
        return "desync"
    if any(e["state"] != "completed" for e in issued.values()):
        return "stuck"
    return None


def verdict(dumps: dict[int, dict], found: dict) -> str:
    if found["kind"] == "none":
        return "no disagreement: every rank's recorded operations line up and completed"
    entries, members = found["entries"], found["members"]
    first = next(iter(entries.values()))
    if found["kind"] == "missing":
        absent = [r for r in members if r not in entries]
        waited = [r for r in members if r in entries]
        now = max(d["dumped_at"] for d in dumps.values())
        wait_s = max(0.0, min(now, max((entries[r]["completed_at"] or now) for r in waited)) - first["issued_at"])
        return (f"rank {','.join(map(str, absent))} never entered {_label(first)} ({_where(first)}); "
                f"rank{'s' if len(waited) > 1 else ''} {','.join(map(str, waited))} waited {wait_s:.0f} s")
    if found["kind"] == "desync":
        groups: dict[tuple, list[int]] = {}
        for r, e in sorted(entries.items()):
            groups.setdefault((e["op"], e["bytes"]), []).append(r)
        parts = [f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))} issued {_label(entries[rs[0]])} at "
                 f"{_where(entries[rs[0]])}" for rs in groups.values()]
        return "desync: " + "; ".join(parts)
    return f"{_label(first)} ({_where(first)}) was issued by every rank of its group and never completed"


def report(run_dir: Path) -> list[str]:
    """The lines `wb debug hang` prints: per rank its dump's reason and last operation, then the verdict."""
    dumps = load(run_dir)
    lines = []
    for rank, body in sorted(dumps.items()):
        last = body["entries"][-1] if body["entries"] else None
        step = "?" if body["step"] is None else body["step"]
        lines.append(f"rank {rank}: dumped on '{body['reason'][:100]}' at step {step}; last: "
                     + (f"{_label(last)} {last['state']} at {_where(last)}" if last else "nothing recorded"))
    missing = sorted(set(range(max(d["world_size"] for d in dumps.values()))) - set(dumps))
    if missing:
        lines.append(f"no dump from rank {','.join(map(str, missing))} (killed before it could write one)")
    found = find(dumps)
    if found["kind"] != "none":
        lines.append(f"first disagreement: group {found['group']} (ranks {found['members']}), "
                     f"operation #{found['seq']}:")
        for r in found["members"]:
            e = found["entries"].get(r)
            lines.append(f"  rank {r}: " + (f"{_label(e)} {e['state']} at {_where(e)}" if e else "never issued it"))
    lines.append(verdict(dumps, found))
    return lines
