"""Checkpoint integrity and retention: manifest with sizes and sha256, fallback past a truncated or
corrupted newest checkpoint, keep-last-K-plus-every-M, weights_only loading."""

from __future__ import annotations

import json

import torch

from tests.cluster.common import TINY, final_params, max_rel_diff


def _train(run_dir, *extra):
    from gpu_workbench.parallel import RunConfig, train

    return train(RunConfig.from_toml(TINY, ["recipe=single", "steps=6", "progress=false", "checkpoint.every=2",
                                            "checkpoint.keep=3", "checkpoint.save_final=true",
                                            f"run_dir={run_dir}", *extra]))


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, capfd):
    run_dir = tmp_path / "run"
    _train(run_dir)
    clean = final_params(run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004", "step_000006"]
    meta = json.loads((ckpts / "step_000006" / "meta.json").read_text())
    state = ckpts / "step_000006" / "dcp" / "__0_0.distcp"   # the model's and optimizer's tensors
    entry = meta["files"]["dcp/__0_0.distcp"]
    assert entry["size"] == state.stat().st_size and len(entry["sha256"]) == 64
    good = state.read_bytes()

    for damage, why in ((good[: len(good) // 2], "bytes, the manifest says"),           # truncated
                        (good[:100] + bytes([good[100] ^ 0xFF]) + good[101:], "sha256")):  # one bit flipped, same size
        state.write_bytes(damage)
        (run_dir / "final_model.pt").unlink()
        s = _train(run_dir, "steps=6")
        assert s.resumed_from_step == 4, why
        assert why in capfd.readouterr().err
        assert max_rel_diff(final_params(run_dir), clean) == 0.0   # step 4 + 2 steps == the uninterrupted run
        assert state.read_bytes() != damage   # the re-run wrote step 6 again


def test_retention_keeps_last_k_plus_every_mth(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "steps=9", "checkpoint.every=1", "checkpoint.keep=2", "checkpoint.keep_every=4")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_000004", "step_000008", "step_000009"]


def test_checkpoints_load_with_weights_only(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "steps=2")
    state = torch.load(run_dir / "checkpoints" / "step_000002" / "trainer_rank0.pt", weights_only=True)
    assert {"scheduler", "lrs", "data", "rng"} <= state.keys() and state["data"]["next_step"] == 2


class _Payload:
    """Unpickling this opens (creates) a file: what an arbitrary pickle in a checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_checkpoint_with_arbitrary_pickle_is_refused(tmp_path, capfd):
    """A newest checkpoint whose trainer_rank0.pt holds a non-tensor pickle (manifest updated to match, so only
    the weights_only check can catch it) is skipped for the previous one, and its payload never runs."""
    from gpu_workbench.parallel import checkpoint

    run_dir = tmp_path / "run"
    _train(run_dir)
    newest = run_dir / "checkpoints" / "step_000006"
    marker = tmp_path / "PWNED"
    state = torch.load(newest / "trainer_rank0.pt", weights_only=True)
    state["extra"] = _Payload(marker)
    torch.save(state, newest / "trainer_rank0.pt")
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"] = checkpoint.file_manifest(newest)
    (newest / "meta.json").write_text(json.dumps(meta))
    assert checkpoint.newest_good(run_dir) == run_dir / "checkpoints" / "step_000004"
    assert "does not load with weights_only=True" in capfd.readouterr().err
    assert not marker.exists()
