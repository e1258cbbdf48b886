"""Pipeline-schedule simulator: which rank runs which micro-batch's forward/backward, and when.

    sim = simulate("1f1b", pp=4, m=8, fwd=1.0, bwd=2.0)
    sim.bubble_fraction            # 3/11 = (p-1)/(m+p-1)
    sim.peak_inflight              # [4, 3, 2, 1]: micro-batches forwarded but not yet backwarded, per rank
    sim.ops[rank]                  # [Op(kind, mb, stage, start, end), ...] in time order

Stages: `pp * v` virtual stages, stage s on rank s % pp (the looped placement of interleaved 1F1B).
Each rank runs its operations in the schedule's order (as torch.distributed.pipelining does), and an
operation starts when the rank is free and its inputs exist:  F(mb, s) after F(mb, s-1);
B(mb, s) after B(mb, s+1) (and its own F);  W(mb, s) after B(mb, s). Communication is free.

Orders per rank r (warm-up counts as in torch and Megatron-LM):
  gpipe             F0 .. F(m-1), then B0 .. B(m-1)
  1f1b              p - r forwards, then alternately one backward and one forward, then the rest
  interleaved-1f1b  as 1f1b over v chunks: micro-batches go round in groups of p per chunk
  zero-bubble       the interleaved order with B split into B (input gradient) and W (weight
                    gradient); a rank whose next F/B must wait runs a deferred W instead (ZB-H1 idea)

The bubble is the idle share of p x makespan; with equal costs it is (p-1)/(m+p-1) for gpipe and
1f1b, (p-1)/(v*m+p-1) for interleaved (v chunks, each 1/v of a stage's work).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")


@dataclass
class Op:
    kind: str       # "F" forward, "B" backward (full, or input-gradient part for zero-bubble), "W" weight grad
    mb: int
    stage: int
    start: float = 0.0
    end: float = 0.0


@dataclass
class Simulation:
    schedule: str
    pp: int
    m: int
    v: int
    ops: dict[int, list[Op]] = field(default_factory=dict)

    @property
    def makespan(self) -> float:
        ops = [o for rank in self.ops.values() for o in rank]
        return max(o.end for o in ops) - min(o.start for o in ops)

    @property
    def bubble_fraction(self) -> float:
        busy = sum(o.end - o.start for rank in self.ops.values() for o in rank)
        return 1.0 - busy / (self.pp * self.makespan)

    @property
    def peak_inflight(self) -> list[int]:
        return [peak_inflight(self.ops[r]) for r in range(self.pp)]


def peak_inflight(ops: list[Op]) -> int:
    """Most micro-batches (per stage) whose forward has finished and whose backward has not."""
    live, peak = 0, 0
    for o in sorted(ops, key=lambda o: o.end):
        live += {"F": 1, "B": -1}.get(o.kind, 0)
        peak = max(peak, live)
    return peak


def closed_form_bubble(schedule: str, pp: int, m: int, v: int = 1) -> float:
    """The textbook bubble with equal per-stage costs: (p-1)/(m+p-1), divided by ~v when interleaved.
    Zero-bubble gets the interleaved figure as an upper bound (deferred W's only shrink it)."""
    chunks = v if schedule in ("interleaved-1f1b", "zero-bubble") else 1
    return (pp - 1) / (chunks * m + pp - 1)


def rank_order(schedule: str, pp: int, m: int, v: int, rank: int) -> list[tuple[str, int, int]]:
    """The (kind, micro-batch, stage) this rank runs, in order (W's of zero-bubble are placed by the simulator)."""
    if schedule == "gpipe":
        return [("F", i, rank) for i in range(m)] + [("B", i, rank) for i in range(m)]
    if schedule == "1f1b":
        fwd = [("F", i, rank) for i in range(m)]
        bwd = [("B", i, rank) for i in range(m)]
        warm = min(m, pp - rank)
    else:   # interleaved-1f1b, zero-bubble: Megatron's order over v chunks

        def unit(k: int, backward: bool) -> tuple[int, int]:
            chunk = (k // pp) % v
            return (k // (pp * v)) * pp + k % pp, (v - 1 - chunk if backward else chunk) * pp + rank

        fwd = [("F", *unit(k, False)) for k in range(m * v)]
        bwd = [("B", *unit(k, True)) for k in range(m * v)]
        hops = 2 * (pp - 1 - rank) if schedule == "interleaved-1f1b" else pp - 1 - rank   # torch's zero-bubble: 1
        warm = min(m * v, (v - 1) * pp + hops + 1)
    order = fwd[:warm]
    for i in range(len(bwd)):
        order.append(bwd[i])
        if warm + i < len(fwd):
            order.append(fwd[warm + i])
    return order


def simulate(schedule: str, pp: int, m: int, v: int = 1, fwd: float | list[float] = 1.0,
             bwd: float | list[float] = 2.0, weight_share: float = 0.5,
             orders: dict[int, list[tuple[str, int, int]]] | None = None) -> Simulation:
    """Simulate one step. `fwd` / `bwd`: per-micro-batch cost of each virtual stage (one number for all).
    zero-bubble splits a backward into B = (1 - weight_share) * bwd and W = weight_share * bwd.
    `orders`: each rank's (kind, mb, stage) list to follow instead of rank_order() (e.g. the one torch
    runs); W's listed there are run where listed, else zero-bubble places them greedily."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule in ("gpipe", "1f1b") and v != 1:
        raise ValueError(f"v (virtual stages per rank) must be 1 for {schedule}, got {v}")
    if schedule in ("interleaved-1f1b", "zero-bubble") and m % pp:
        raise ValueError(f"m ({m}) must be a multiple of pp ({pp}) for {schedule}")
    n_stages = pp * v
    f = fwd if isinstance(fwd, list) else [float(fwd)] * n_stages
    b = bwd if isinstance(bwd, list) else [float(bwd)] * n_stages
    given = orders is not None
    orders = orders if given else {r: rank_order(schedule, pp, m, v, r) for r in range(pp)}
    split = schedule == "zero-bubble" or any(k == "W" for order in orders.values() for k, _, _ in order)
    greedy = split and not any(k == "W" for order in orders.values() for k, _, _ in order)
    done: dict[tuple[str, int, int], float] = {}
    free, ptr = [0.0] * pp, [0] * pp
    deferred: dict[int, list[tuple[int, int]]] = {r: [] for r in range(pp)}
    ops: dict[int, list[Op]] = {r: [] for r in range(pp)}

    def run(r: int, kind: str, mb: int, s: int, at: float) -> None:
        cost = f[s] if kind == "F" else b[s] * (weight_share if kind == "W" else (1 - weight_share) if split else 1)
        ops[r].append(Op(kind, mb, s, at, at + cost))
        done[kind, mb, s] = free[r] = at + cost
        if kind == "B" and greedy:
            deferred[r].append((mb, s))

    def dependency(kind: str, mb: int, s: int) -> tuple[str, int, int] | None:
        if kind == "F":
            return ("F", mb, s - 1) if s > 0 else None
        if kind == "W":
            return ("B", mb, s)
        return ("B", mb, s + 1) if s < n_stages - 1 else ("F", mb, s)

    while any(ptr[r] < len(orders[r]) for r in range(pp)):
        for r in sorted(range(pp), key=lambda r: free[r]):
            if ptr[r] == len(orders[r]):
                continue
            kind, mb, s = orders[r][ptr[r]]
            dep = dependency(kind, mb, s)
            ready = done.get(dep, None) if dep else 0.0
            if ready is not None and (ready <= free[r] or not deferred[r]):
                run(r, kind, mb, s, max(free[r], ready))
                ptr[r] += 1
                break
            if deferred[r]:   # the next F/B must wait: fill the gap with a weight gradient
                run(r, "W", *deferred[r].pop(0), free[r])
                break
        else:
            raise RuntimeError(f"{schedule}: simulated pipeline deadlocked (pp={pp}, m={m}, v={v})")
    for r in range(pp):
        while deferred[r]:
            run(r, "W", *deferred[r].pop(0), free[r])
    return Simulation(schedule, pp, m, v, ops)
