"""The pipeline's bubble as m grows, and micro-batches in flight (1F1B <= pp, GPipe = m), on real torchrun
processes.

Only what load cannot change is asserted here: the closed form, the simulator's prediction (on the measured
stage costs) falling with m, a measured bubble inside [0, 1), and the in-flight counts. How close the
measured bubble comes to the prediction is a timing: `make bench` judges it
(tests/bench/test_pipeline_bubble_timing.py).
"""

from __future__ import annotations

import pytest

from tests.helpers.runs import summary
from tests.helpers.workers.pipeline_runs import heavy, torchrun

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
def test_bubble_predicted_falls_with_microbatches(bubble_runs):
    got = {m: summary(bubble_runs[f"m{m}"]) for m in BUBBLE_M}
    predicted = [got[m]["bubble_fraction_predicted"] for m in BUBBLE_M]
    assert predicted[0] > predicted[1] > predicted[2] > 0.0, predicted
    for m, s in got.items():
        assert s["bubble_fraction_closed_form"] == pytest.approx(1 / (m + 1))
        assert 0.0 <= s["bubble_fraction_measured"] < 1.0, s["bubble_fraction_measured"]
        assert len(s["bubble_fraction_measured_by_step"]) == len(s["cpu_stolen_fraction_by_step"]) > 0


@pytest.mark.slow
def test_microbatches_in_flight(bubble_runs):
    one_f_one_b, gpipe = summary(bubble_runs["m8"]), summary(bubble_runs["gpipe-m8"])
    assert one_f_one_b["peak_inflight_microbatches_by_rank"] == [2, 1]   # pp - rank <= pp
    assert one_f_one_b["peak_inflight_microbatches_measured"] <= 2
    assert gpipe["peak_inflight_microbatches_by_rank"] == [8, 8]         # every micro-batch before any backward
    assert gpipe["peak_inflight_microbatches_predicted"] == 8
    assert one_f_one_b["peak_inflight_microbatches_predicted"] == 2
