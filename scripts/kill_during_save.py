"""SIGKILL `wb train` at random moments during checkpoint saves, N times, and check every resume.

    python scripts/kill_during_save.py [--trials 20] [--seed 0]

Prints one row per trial (mode, when the kill landed, whether a save was under way, damaged
checkpoints left, resumed run bit-identical) and exits 1 if any trial failed. The suite runs three
trials of the same code (tests/parallel/checkpoint/test_kill_during_save.py).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.kill_trials import reference_run, run_trial  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference = reference_run(root)
        trials = [run_trial(root, reference, ("mid-save", "random")[i % 2], rng) for i in range(args.trials)]
    print(f"{'trial':>5} {'mode':>8} {'killed at s':>11} {'mid-save':>8} {'damaged':>7} {'identical':>9}")
    for i, t in enumerate(trials):
        when = f"{t.killed_at_s:.2f}" if t.killed_at_s is not None else "finished"
        print(f"{i:>5} {t.mode:>8} {when:>11} {str(t.saw_tmp):>8} {len(t.damaged_left):>7} {str(t.identical):>9}")
    bad = [t for t in trials if t.damaged_left or not t.identical]
    print(f"{len(trials) - len(bad)} passed, {len(bad)} failed; {sum(t.saw_tmp for t in trials)} kills during a save")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
