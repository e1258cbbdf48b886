"""A small autotuner shared by every kernel: explicit configs, timed once per key, cached.

Explicit config lists (rather than `@triton.autotune`) let the ahead-of-time compile check and the
interpreter tests enumerate exactly the configs the GPU may pick. On a GPU each candidate is timed
with `triton.testing.do_bench` the first time a key is seen; the winner is kept in memory and in a
JSON file per GPU model (`WB_AUTOTUNE_CACHE`, default `~/.cache/gpu-workbench/autotune`).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Config:
    meta: dict = field(default_factory=dict)  # the kernel's tl.constexpr block sizes
    num_warps: int = 4
    num_stages: int = 2

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.meta.items())), self.num_warps, self.num_stages))

    def launch_options(self) -> dict:
        return {**self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def label(self) -> str:
        blocks = " ".join(f"{k}={v}" for k, v in self.meta.items())
        return f"{blocks} w{self.num_warps} s{self.num_stages}"

    def to_json(self) -> dict:
        return {"meta": self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}


def _cache_dir() -> Path:
    return Path(os.environ.get("WB_AUTOTUNE_CACHE", Path.home() / ".cache" / "gpu-workbench" / "autotune"))


def _do_bench_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20)


class Autotuner:
    def __init__(self, name: str, configs: list[Config], timer: Callable[[Callable], float] = _do_bench_ms):
        if not configs:
            raise ValueError(f"autotuner {name!r} needs at least one config")
        self.name = name
        self.configs = list(configs)
        self.timer = timer  # milliseconds of one call of a launch closure
        self._best: dict[Hashable, Config] = {}
        self._lock = threading.Lock()

    def candidates(self, fits: Callable[[Config], bool] | None = None) -> list[Config]:
        chosen = [c for c in self.configs if fits is None or fits(c)]
        if not chosen:
            raise ValueError(f"no {self.name} config fits this problem")
        return chosen

    def pick(self, key: Hashable, run: Callable[[Config], object], *, timed: bool,
             fits: Callable[[Config], bool] | None = None) -> Config:
        """Best config for `key`. With `timed=False` (interpreter), the first fitting config."""
        candidates = self.candidates(fits)
        if not timed or len(candidates) == 1:
            return candidates[0]
        with self._lock:
            if key in self._best:
                return self._best[key]
            stored = self._load_disk().get(self._disk_key(key))
            best = next((c for c in candidates if stored and c.to_json() == stored), None)
            if best is None:
                best = self._time(candidates, run)
                self._save_disk(key, best)
            self._best[key] = best
            return best

    def _time(self, candidates: list[Config], run: Callable[[Config], object]) -> Config:
        timings = {}
        for config in candidates:
            try:
                timings[config] = self.timer(lambda c=config: run(c))
            except Exception as err:  # a config that does not fit this GPU (shared memory, registers)
                if "OutOfResources" not in type(err).__name__ and "out of resource" not in str(err):
                    raise
        if not timings:
            raise RuntimeError(f"every {self.name} config failed to launch on this GPU")
        return min(timings, key=timings.get)

    # -- on-disk cache, one JSON file per GPU model ------------------------------------------
    def _disk_path(self) -> Path:
        import torch
        import triton

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        device = device.replace(" ", "_").replace("/", "_")
        return _cache_dir() / f"{device}-triton{triton.__version__}.json"

    def _disk_key(self, key: Hashable) -> str:
        return f"{self.name}:{key!r}"

    def _load_disk(self) -> dict:
        try:
            return json.loads(self._disk_path().read_text())
        except (OSError, ValueError):
            return {}

    def _save_disk(self, key: Hashable, config: Config) -> None:
        path = self._disk_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            table = self._load_disk()
            table[self._disk_key(key)] = config.to_json()
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump(table, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, path)
        except OSError:
            pass  # a read-only home only costs re-tuning next time
