"""A handful of SIGKILLs during checkpoint saves (scripts/kill_during_save.py runs 20+): none leaves a
damaged checkpoint that looks resumable, and every resume ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import random

import pytest

from tests.helpers.kill_trials import reference_run, run_trial

pytestmark = pytest.mark.slow


def test_sigkill_during_saves_then_resume_is_bit_identical(tmp_path):
    rng = random.Random(1234)
    reference = reference_run(tmp_path)
    trials = [run_trial(tmp_path, reference, mode, rng) for mode in ("mid-save", "mid-save", "random")]
    assert any(t.saw_tmp for t in trials), f"no kill landed during a save: {trials}"
    for t in trials:
        assert t.damaged_left == [], t
        assert t.identical, t
