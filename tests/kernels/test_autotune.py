"""The shared autotuner: picks the fastest fitting config, caches it in memory and on disk."""

from __future__ import annotations

import json

import pytest

from gpu_workbench.kernels.autotune import Autotuner, Config

CONFIGS = [Config({"BLOCK": b}, num_warps=w) for b in (16, 32, 64) for w in (4, 8)]


def _timer_from(costs):
    calls = []

    def timer(launch):
        config = launch()  # the launch closure returns the config it ran
        calls.append(config)
        if costs[config] is None:
            raise type("OutOfResources", (Exception,), {})("out of resource: shared memory")
        return costs[config]

    return timer, calls


def test_picks_fastest_fitting_config_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WB_AUTOTUNE_CACHE", str(tmp_path))
    costs = {c: 1.0 + i for i, c in enumerate(CONFIGS)}
    costs[CONFIGS[4]] = 0.1  # fastest overall, but does not fit below
    costs[CONFIGS[3]] = 0.5
    timer, calls = _timer_from(costs)
    tuner = Autotuner("t", CONFIGS, timer=timer)
    fits = lambda c: c.meta["BLOCK"] <= 32
    best = tuner.pick(("key", 1), lambda c: c, timed=True, fits=fits)
    assert best == CONFIGS[3] and len(calls) == 4
    assert tuner.pick(("key", 1), lambda c: c, timed=True, fits=fits) == best and len(calls) == 4
    stored = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert list(stored.values()) == [best.to_json()]
    # A new process (a new tuner) reads the disk cache instead of timing again.
    timer2, calls2 = _timer_from(costs)
    assert Autotuner("t", CONFIGS, timer=timer2).pick(("key", 1), lambda c: c, timed=True, fits=fits) == best
    assert calls2 == []


def test_skips_configs_out_of_resources(tmp_path, monkeypatch):
    monkeypatch.setenv("WB_AUTOTUNE_CACHE", str(tmp_path))
    costs = {c: 2.0 for c in CONFIGS}
    costs[CONFIGS[0]] = None
    costs[CONFIGS[5]] = 1.0
    timer, _ = _timer_from(costs)
    assert Autotuner("t", CONFIGS, timer=timer).pick("k", lambda c: c, timed=True) == CONFIGS[5]


def test_untimed_pick_is_first_fitting_and_no_fit_is_an_error():
    tuner = Autotuner("t", CONFIGS, timer=lambda launch: pytest.fail("must not time"))
    assert tuner.pick("k", lambda c: c, timed=False, fits=lambda c: c.num_warps == 8) == CONFIGS[1]
    with pytest.raises(ValueError, match="no t config fits"):
        tuner.pick("k", lambda c: c, timed=False, fits=lambda c: False)
