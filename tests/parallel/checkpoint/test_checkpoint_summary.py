"""checkpoint_bytes_written / checkpoint_blocking_s in the run summary: measured from the files each save
wrote (pruned ones included), and the time the loop spent in saves. One single run in this process."""

from __future__ import annotations

import contextlib
import io

from tests.helpers.runs import TINY, summary


def test_bytes_written_counts_every_save_and_blocking_time_is_measured(tmp_path):
    from gpu_workbench.parallel import RunConfig, train

    with contextlib.redirect_stderr(io.StringIO()):
        train(RunConfig.from_toml(TINY, ["recipe=single", "progress=false", "steps=3", "checkpoint.every=1",
                                         "checkpoint.keep=1", f"run_dir={tmp_path}"]))
    s = summary(tmp_path)
    (kept,) = (tmp_path / "checkpoints").iterdir()   # keep=1: two of the three saves were pruned
    one = sum(f.stat().st_size for f in kept.rglob("*") if f.is_file())
    assert 2.9 * one < s["checkpoint_bytes_written"] < 3.1 * one
    assert s["checkpoint_blocking_s"] > 0
