"""The schedule simulator against the closed forms: bubble (p-1)/(m+p-1) for GPipe and 1F1B, divided by
~v when interleaved; peak micro-batches in flight m for GPipe, p - rank for 1F1B; dependencies respected."""

from __future__ import annotations

import pytest

from gpu_workbench.parallel.primitives.pipeline.bubble import measure, step_bubble
from gpu_workbench.parallel.primitives.pipeline.schedule import closed_form_bubble, rank_order, simulate
from gpu_workbench.parallel.primitives.pipeline.stages import split_layers

CASES = [(2, 2), (2, 4), (2, 8), (4, 4), (4, 8), (4, 16), (8, 8)]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("pp", "m"), CASES)
def test_bubble_closed_form(schedule, pp, m):
    sim = simulate(schedule, pp, m, fwd=1.0, bwd=2.0)
    assert sim.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)
    assert sim.makespan == pytest.approx((m + pp - 1) * 3.0)
    expected = [m] * pp if schedule == "gpipe" else [min(m, pp - r) for r in range(pp)]
    assert sim.peak_inflight == expected


@pytest.mark.parametrize("v", [2, 4])
@pytest.mark.parametrize(("pp", "m"), [(2, 4), (2, 8), (4, 8), (4, 16)])
def test_interleaved_divides_bubble_by_v(pp, m, v):
    """Each of the v chunks does 1/v of a rank's work: bubble (p-1)/(v*m+p-1), Megatron-LM's figure."""
    sim = simulate("interleaved-1f1b", pp, m, v, fwd=1.0 / v, bwd=2.0 / v)
    assert sim.bubble_fraction == pytest.approx(closed_form_bubble("interleaved-1f1b", pp, m, v), abs=1e-12)
    idle = sim.bubble_fraction * sim.makespan            # per rank: 1F1B's (p-1)(f+b), divided by v
    assert idle == pytest.approx((pp - 1) * 3.0 / v)
    assert max(sim.peak_inflight) > pp   # the price: more activations held than 1F1B's <= p


@pytest.mark.parametrize(("pp", "m", "v"), [(2, 4, 1), (4, 8, 1), (4, 8, 2)])
def test_zero_bubble_beats_1f1b(pp, m, v):
    """Deferred weight gradients fill the drain: below 1F1B's (interleaved's) bubble, same memory bound."""
    zb = simulate("zero-bubble", pp, m, v, fwd=1.0 / v, bwd=2.0 / v)
    ref = simulate("1f1b" if v == 1 else "interleaved-1f1b", pp, m, v, fwd=1.0 / v, bwd=2.0 / v)
    assert zb.bubble_fraction < 0.6 * ref.bubble_fraction
    if v == 1:
        assert zb.peak_inflight == [pp - r for r in range(pp)]
    assert sorted(o.kind for o in zb.ops[0]).count("W") == m * v


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b", "zero-bubble"])
def test_dependencies_and_no_overlap(schedule):
    pp, m, v = 4, 8, 1 if schedule in ("gpipe", "1f1b") else 2
    sim = simulate(schedule, pp, m, v, fwd=[1.0, 1.5, 0.7, 1.2] * v, bwd=[2.0, 2.5, 1.9, 3.0] * v)
    end = {(o.kind, o.mb, o.stage): o.end for ops in sim.ops.values() for o in ops}
    for r, ops in sim.ops.items():
        for a, b in zip(ops, ops[1:], strict=False):
            assert b.start >= a.end - 1e-12, f"rank {r} runs two things at once"
        for o in ops:
            assert o.stage % pp == r
            if o.kind == "F" and o.stage > 0:
                assert o.start >= end["F", o.mb, o.stage - 1] - 1e-12
            if o.kind == "B" and o.stage < pp * v - 1:
                assert o.start >= end["B", o.mb, o.stage + 1] - 1e-12
    assert len(end) == (3 if schedule == "zero-bubble" else 2) * m * pp * v


def test_orders_and_errors():
    assert rank_order("1f1b", 2, 4, 1, 0) == [("F", 0, 0), ("F", 1, 0), ("B", 0, 0), ("F", 2, 0), ("B", 1, 0),
                                              ("F", 3, 0), ("B", 2, 0), ("B", 3, 0)]
    with pytest.raises(ValueError, match="v .* must be 1 for gpipe"):
        simulate("gpipe", 2, 4, v=2)
    with pytest.raises(ValueError, match="multiple of pp"):
        simulate("interleaved-1f1b", 4, 6, v=2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        simulate("2f2b", 2, 4)


def test_split_layers_balances_parameters():
    assert split_layers([10] * 4, 2) == [2, 2]
    assert split_layers([10] * 4, 2, first=25) == [1, 3]          # a large embedding pushes blocks on
    assert split_layers([10] * 6, 3, first=5, last=15) == [2, 3, 1]   # stage costs 25, 30, 25
    assert split_layers([10] * 3, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages"):
        split_layers([10, 10], 3)


def test_measured_bubble_from_spans():
    """Two ranks, spans in ms: busy 60 and 50 of an 80 ms window; a core taken away mid-span (wall > CPU
    time) shows as stolen time and a larger bubble; the smallest bubble over the kept steps is reported."""
    ms = 1_000_000

    def span(kind, mb, stage, a, b, cpu=None):
        return (kind, mb, stage, a * ms, b * ms, (b - a if cpu is None else cpu) * ms)

    clean = {0: [span("F", 0, 0, 0, 10), span("F", 1, 0, 10, 20), span("R", -1, -1, 20, 30),
                 span("B", 0, 0, 30, 50), span("B", 1, 0, 60, 80)],
             1: [span("F", 0, 1, 10, 20), span("B", 0, 1, 20, 30), span("F", 1, 1, 30, 40),
                 span("B", 1, 1, 40, 60)]}
    assert step_bubble(clean) == (pytest.approx(1 - 55 / 80), 0.0)
    slow = {0: [*clean[0][:4], span("B", 1, 0, 60, 120, cpu=20)], 1: clean[1]}   # rank 0 lost its core 40 ms
    assert step_bubble(slow) == (pytest.approx(1 - 75 / 120), pytest.approx(40 / 150))
    got = measure({(0, 0): [clean[0], slow[0], clean[0]], (1, 0): [clean[1], slow[1], clean[1]]}, cpu_costs=True,
                  n_stages=2)
    assert got["bubble"] == pytest.approx(1 - 55 / 80) and len(got["by_step"]) == 2   # step 0 left out
    assert got["costs"]["F"] == [10.0, 10.0] and got["costs"]["B"] == [20.0, 15.0] and got["costs"]["W"] == [0, 0]
