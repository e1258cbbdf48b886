"""The pipeline's measured bubble against the simulator's prediction as m grows: a timing, so it runs
under `make bench` only (marker `timing`; `make test` deselects it). On a shared CPU another process can
take a core from a stage mid-schedule, and the measured bubble then says nothing about the schedule."""

from __future__ import annotations

import pytest

from tests.helpers.runs import summary
from tests.helpers.workers.pipeline_runs import heavy, torchrun

pytestmark = pytest.mark.timing
BUBBLE_M = [2, 4, 8]


def test_bubble_measured_against_predicted(benchmark, tmp_path):
    """Compute-dominated micro-batches (~10 ms forward per stage); the reported step is the one with the
    smallest bubble out of 7 (noise only ever adds idle time)."""
    items = [list(heavy("1f1b", m, tmp_path / f"m{m}")) for m in BUBBLE_M]
    benchmark.pedantic(torchrun, args=(2, items), rounds=1, iterations=1)
    got = {m: summary(tmp_path / f"m{m}") for m in BUBBLE_M}
    measured = [got[m]["bubble_fraction_measured"] for m in BUBBLE_M]
    report = {m: (round(s["bubble_fraction_measured"], 3), round(s["bubble_fraction_predicted"], 3))
              for m, s in got.items()}
    benchmark.extra_info.update({f"m{m}": r for m, r in report.items()})
    assert measured[0] > measured[1] > measured[2] > 0.0, report
    for s in got.values():
        assert abs(s["bubble_fraction_predicted"] - s["bubble_fraction_closed_form"]) < 0.05, report
    assert abs(measured[2] - got[8]["bubble_fraction_predicted"]) <= 0.15, report
