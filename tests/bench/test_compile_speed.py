"""train.compile and model.activation_checkpointing, timed side by side on this CPU (`make bench` only, marker
`timing`): compiled/eager median step time for llama-tiny under single, ddp x2 and ddp x2 with tp=2, and
selective/none and full/none step time and activation bytes. Each pair runs in one torchrun launch, one after
the other, with one inductor cache; the median skips the first STEPS_SKIPPED steps (the compile, warm-up).
Ratios are recorded (benchmark.extra_info, printed), not asserted: the goals (issue 34: compiled single <= 0.7,
tp=2 <= 0.3) are what BENCHMARKS.md compares them with."""

from __future__ import annotations

import statistics

import pytest

from gpu_workbench.parallel.runtime.rundir import read_metrics
from tests.helpers.cli import ROOT
from tests.helpers.runs import summary, torchrun

pytestmark = pytest.mark.timing
LLAMA = str(ROOT / "configs" / "llama-tiny.toml")
STEPS, STEPS_SKIPPED = 20, 3
COMMON = [f"steps={STEPS}", "progress=false", "checkpoint.every=0", "eval.every=0"]
LAYOUTS = {"single": (1, ["recipe=single"]), "ddp x2": (2, ["recipe=ddp"]),
           "ddp x2 tp=2": (2, ["recipe=ddp", "tp.degree=2"])}


def median_step_s(run_dir) -> float:
    return statistics.median(m["step_time_s"] for m in read_metrics(run_dir)[STEPS_SKIPPED:])


def _pairs(tmp_path, nproc: int, runs: dict[str, list[str]]) -> dict[str, float]:
    torchrun(nproc, [(LLAMA, [*COMMON, *extra, f"run_dir={tmp_path / name}"]) for name, extra in runs.items()],
             timeout=1800)
    return {name: median_step_s(tmp_path / name) for name in runs}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_over_eager(benchmark, tmp_path, monkeypatch, layout):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    nproc, extra = LAYOUTS[layout]
    runs = {"eager": extra, "compiled": [*extra, "train.compile=true"]}
    times = benchmark.pedantic(_pairs, args=(tmp_path, nproc, runs), rounds=1, iterations=1)
    ratio = times["compiled"] / times["eager"]
    benchmark.extra_info.update({"eager_ms": 1e3 * times["eager"], "compiled_ms": 1e3 * times["compiled"],
                                 "compiled_over_eager": ratio,
                                 "compile_s": summary(tmp_path / "compiled")["compile_s"]})
    print(f"\n{layout}: eager {1e3 * times['eager']:.1f} ms, compiled {1e3 * times['compiled']:.1f} ms, "
          f"ratio {ratio:.2f}, compile {benchmark.extra_info['compile_s']:.1f} s")


def test_checkpointing_modes(benchmark, tmp_path):
    """single, eager: each mode's median step and the activation bytes one micro-batch kept, over none's."""
    runs = {mode: ["recipe=single", f"model.activation_checkpointing={mode}"] for mode in ("none", "full", "selective")}
    times = benchmark.pedantic(_pairs, args=(tmp_path, 1, runs), rounds=1, iterations=1)
    kept = {mode: summary(tmp_path / mode)["activation_bytes_saved"] for mode in runs}
    for mode in ("full", "selective"):
        benchmark.extra_info[f"{mode}_over_none_time"] = times[mode] / times["none"]
        benchmark.extra_info[f"{mode}_over_none_bytes"] = kept[mode] / kept["none"]
        print(f"\n{mode}/none: step time {times[mode] / times['none']:.2f} ({1e3 * times[mode]:.1f} ms vs "
              f"{1e3 * times['none']:.1f} ms), activation bytes {kept[mode] / kept['none']:.2f} "
              f"({kept[mode]:,} vs {kept['none']:,})")
