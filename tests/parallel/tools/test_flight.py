"""The flight recorder and `wb debug hang`: a rank hung on purpose under fsdp x4 and under the pipeline x2 is
named with the operation it never entered; a rank that skips a collective on purpose (ddp x2) is named as a
desync; `wb debug dump` on a run that is not running, and the analysis of hand-made dumps. One launch per
scenario (the runs fail by design), with a 10 s collective timeout and 2 tiny steps."""

from __future__ import annotations

import json

import pytest

from tests.helpers.runs import TINY, wb

FAST = ["progress=false", "checkpoint.every=0", "model.n_layers=2", "global_batch=8", "micro_batch=2", "steps=3",
        "fault.collective_timeout_s=10"]   # short, and long enough for a busy 2-core box


def _run(run_dir, nproc: int, *overrides: str):
    done = wb("train", "--nproc", str(nproc), "--config", TINY, *FAST, *overrides, "--run-dir", str(run_dir))
    assert done.returncode != 0, "the injected fault should have stopped the run"
    return wb("debug", "hang", str(run_dir))


@pytest.mark.parametrize("nproc, layout", [(4, ["recipe=fsdp"]), (2, ["recipe=pipeline", "pp.gantt=false"])],
                         ids=["fsdp-x4", "pipeline-x2"])
def test_hang_names_the_rank_and_the_operation(nproc, layout, tmp_path):
    done = _run(tmp_path / "run", nproc, *layout, "fault.hang_rank=1", "fault.at_step=1")
    assert done.returncode == 0, done.stderr
    verdict = done.stdout.strip().splitlines()[-1]
    waiting = ",".join(str(r) for r in range(nproc) if r != 1)
    assert verdict.startswith("rank 1 never entered "), done.stdout
    assert "step 1" in verdict and "waited" in verdict and waiting in verdict.split(";")[-1], verdict
    hung = json.loads((tmp_path / "run" / "flight" / "rank1.json").read_text())   # at the hang, or at SIGTERM after
    assert hung["reason"].startswith(("injected hang (fault.hang_rank) at step 1", "SIGTERM"))
    assert all(e["step"] < 1 for e in hung["entries"])
    dump = json.loads((tmp_path / "run" / "flight" / "rank0.json").read_text())
    assert dump["reason"].startswith("CollectiveTimeout") and dump["entries"][-1]["state"] == "timed out"


def test_skipped_collective_is_named_a_desync(tmp_path):
    done = _run(tmp_path / "run", 2, "recipe=ddp", "fault.skip_collective_rank=1", "fault.skip_collective_at_step=1",
                "fault.flight_write_through=true")
    assert done.returncode == 0, done.stderr
    verdict = done.stdout.strip().splitlines()[-1]
    assert verdict.startswith("desync: rank 0 issued all_reduce #"), done.stdout
    assert "mean_over_ranks" in verdict and "rank 1 issued all_reduce #" in verdict


def _entry(seq, op="all_reduce", nbytes=8, state="completed", ranks=(0, 1)):
    return {"seq": seq, "op": op, "group": "0", "ranks": list(ranks), "peer": None, "shapes": [[2]],
            "dtype": "torch.float32", "bytes": nbytes, "state": state, "issued_at": 100.0 + seq,
            "completed_at": 100.5 + seq if state == "completed" else None, "step": seq, "site": f"x.py:{seq} in f",
            "torch_site": ""}


def _write(folder, rank, entries, world=2):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world, "pid": 1, "step": 0,
                                                         "reason": "test", "dumped_at": 130.0, "entries": entries}))


def test_analysis_of_dumps_made_by_hand(tmp_path):
    from gpu_workbench.parallel.tools.flight_analysis import find, load, report

    folder = tmp_path / "flight"
    _write(folder, 0, [_entry(0), _entry(1), _entry(2, state="timed out")])
    _write(folder, 1, [_entry(0), _entry(1)])
    assert report(tmp_path)[-1] == ("rank 1 never entered all_reduce #2 (8 B float32, step 2) (x.py:2 in f); "
                                    "rank 0 waited 28 s")
    _write(folder, 1, [_entry(0), _entry(1), _entry(2, op="all_gather", nbytes=16)])
    assert find(load(tmp_path))["kind"] == "desync"
    _write(folder, 1, [_entry(0), _entry(1), _entry(2, state="timed out")])
    assert find(load(tmp_path))["kind"] == "stuck" and "never completed" in report(tmp_path)[-1]
    _write(folder, 0, [_entry(0)])
    _write(folder, 1, [_entry(0)])
    assert find(load(tmp_path))["kind"] == "none"


def test_debug_commands_on_a_directory_without_dumps(tmp_path, cli):
    done = cli("debug", "hang", str(tmp_path))
    assert done.returncode == 2 and "no flight-recorder dumps" in done.stderr
    done = cli("debug", "dump", str(tmp_path))
    assert done.returncode == 2 and "no running ranks recorded" in done.stderr
