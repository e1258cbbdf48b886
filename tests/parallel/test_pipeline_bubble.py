"""The pipeline's bubble measured against the prediction as m grows, and micro-batches in flight (1F1B <= pp,
GPipe = m), on real torchrun processes.

These runs time themselves, so the file is marked `serial`: `make test` runs it alone, after the tests it
runs in parallel, where another test's processes would take the CPU from a stage mid-schedule.
"""

from __future__ import annotations

import pytest

from tests.parallel.pipeline_runs import heavy, torchrun
from tests.parallel.runs import summary

pytestmark = pytest.mark.serial
BUBBLE_M = [2, 4, 8]


@pytest.fixture(scope="module")
def bubble_runs(tmp_path_factory):
    """One 2-process launch: compute-dominated 1f1b runs at m = 2, 4, 8 and a gpipe run at m = 8."""
    root = tmp_path_factory.mktemp("bubble")
    dirs, items = {}, []
    for m in BUBBLE_M:
        dirs[f"m{m}"] = root / f"m{m}"
        items.append(list(heavy("1f1b", m, dirs[f"m{m}"])))
    dirs["gpipe-m8"] = root / "gpipe-m8"
    items.append(list(heavy("gpipe", 8, dirs["gpipe-m8"])))
    torchrun(2, items)
    return dirs


@pytest.mark.slow
def test_bubble_measured_against_predicted(bubble_runs):
    """Measured on compute-dominated micro-batches (~10 ms forward per stage); the reported step is the one
    with the smallest bubble out of 7 (parallel.bubble: on a shared CPU, noise only ever adds idle time)."""
    got = {m: summary(bubble_runs[f"m{m}"]) for m in BUBBLE_M}
    measured = [got[m]["bubble_fraction_measured"] for m in BUBBLE_M]
    report = {m: (round(s["bubble_fraction_measured"], 3), round(s["bubble_fraction_predicted"], 3),
                  s["bubble_fraction_measured_by_step"], s["cpu_stolen_fraction_by_step"]) for m, s in got.items()}
    assert measured[0] > measured[1] > measured[2], report
    for m, s in got.items():
        assert s["bubble_fraction_closed_form"] == pytest.approx(1 / (m + 1))
        assert abs(s["bubble_fraction_predicted"] - 1 / (m + 1)) < 0.05, report   # stages about equal
    assert abs(measured[2] - got[8]["bubble_fraction_predicted"]) <= 0.15, report
    assert 0.0 < measured[2] < measured[0]


@pytest.mark.slow
def test_microbatches_in_flight(bubble_runs):
    one_f_one_b, gpipe = summary(bubble_runs["m8"]), summary(bubble_runs["gpipe-m8"])
    assert one_f_one_b["peak_inflight_microbatches_by_rank"] == [2, 1]   # pp - rank <= pp
    assert one_f_one_b["peak_inflight_microbatches_measured"] <= 2
    assert gpipe["peak_inflight_microbatches_by_rank"] == [8, 8]         # every micro-batch before any backward
    assert gpipe["peak_inflight_microbatches_predicted"] == 8
    assert one_f_one_b["peak_inflight_microbatches_predicted"] == 2
