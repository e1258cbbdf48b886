"""Universal checkpoints (parallel/checkpoint/universal.py): one training state that every torch recipe
writes and reads on any layout. One chain of runs, each link starting from the previous link's checkpoint:

    single (reference, 8 steps) --step 2--> fsdp x2, killed at step 4 --resumed in its run dir--> single
    fsdp's step 4 --load_from--> pipeline x2 --step 5--> ddp x2 --step 6--> ddp tp=2 --step 7--> single
    ddp x2's step 6 --load_from--> zero2 x2 --step 7--> zero3 x2
    ddp x2's step 6 --load_from--> ddp cp=2 (context parallel) --step 7--> single
    ddp tp=2's and zero3's step 8 --wb checkpoint export--> safetensors

Every link's per-step losses equal the uninterrupted reference's within 1e-5, and the exported weights its
final weights. Six launches in all: four in this process, one killed CLI run, one torchrun of six runs
(the `wb checkpoint` commands run in this process too).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from gpu_workbench.parallel.runtime.errors import UserError
from tests.helpers.runs import TINY, final_params, losses, torchrun, wb

pytestmark = pytest.mark.slow

BASE = ["progress=false", "steps=8", "checkpoint.every=1", "checkpoint.keep=8", "checkpoint.save_final=true",
        "optim.warmup_steps=3"]
TOL = 1e-5


def _train_here(*overrides: str) -> str:
    """Train in this process (single: no process group); what it printed on stderr."""
    from gpu_workbench.parallel import RunConfig, train

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train(RunConfig.from_toml(TINY, [*BASE, "recipe=single", *overrides]))
    return err.getvalue()


def _step(run, n: int) -> str:
    return str(run / "checkpoints" / f"step_{n:06d}")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("universal")
    runs = {name: root / name for name in ("ref", "fsdp", "pipe", "ddp", "tp", "z2", "z3", "last", "cp", "cpread")}
    _train_here(f"run_dir={runs['ref']}")
    killed = wb("train", "--recipe", "fsdp", "--nproc", "2", "--config", TINY, *BASE, "checkpoint.every=2",
                f"run_dir={runs['fsdp']}", f"checkpoint.load_from={_step(runs['ref'], 2)}",
                "fault.kill_rank=1", "fault.at_step=4")
    assert killed.returncode != 0, killed.stderr[-2000:]
    assert [p.name for p in (runs["fsdp"] / "checkpoints").iterdir()] == ["step_000004"]
    resumed = _train_here(f"run_dir={runs['fsdp']}", "checkpoint.every=2")   # the same run dir, as single
    torchrun(2, [(TINY, [*BASE, "recipe=pipeline", f"run_dir={runs['pipe']}",
                         f"checkpoint.load_from={_step(runs['fsdp'], 4)}"]),
                 (TINY, [*BASE, "recipe=ddp", f"run_dir={runs['ddp']}",
                         f"checkpoint.load_from={_step(runs['pipe'], 5)}"]),
                 (TINY, [*BASE, "recipe=ddp", "tp.degree=2", f"run_dir={runs['tp']}",
                         f"checkpoint.load_from={_step(runs['ddp'], 6)}"]),
                 (TINY, [*BASE, "recipe=zero2", f"run_dir={runs['z2']}",
                         f"checkpoint.load_from={_step(runs['ddp'], 6)}"]),
                 (TINY, [*BASE, "recipe=zero3", f"run_dir={runs['z3']}",
                         f"checkpoint.load_from={_step(runs['z2'], 7)}"]),
                 (TINY, [*BASE, "recipe=ddp", "cp.degree=2", f"run_dir={runs['cp']}",
                         f"checkpoint.load_from={_step(runs['ddp'], 6)}"])])
    _train_here(f"run_dir={runs['last']}", f"checkpoint.load_from={runs['tp'] / 'checkpoints' / 'step_000007'}")
    _train_here(f"run_dir={runs['cpread']}", f"checkpoint.load_from={_step(runs['cp'], 7)}")
    return runs, resumed


def _segments(run) -> list[dict]:
    return json.loads((run / "config.json").read_text())["segments"]


def _matches_reference(run, ref, first: int) -> None:
    got, want = losses(run), losses(ref)[first:]
    assert len(got) == len(want) == 8 - first
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOL, (got, want)


def test_killed_fsdp_run_resumes_as_single(chain):
    runs, stderr = chain
    assert "resuming step_000004 written by fsdp on 2 ranks as single on 1 rank: resharding" in stderr
    _matches_reference(runs["fsdp"], runs["ref"], first=2)   # fsdp's steps 3-4 and single's 5-8
    first, second = _segments(runs["fsdp"])
    assert first["checkpoint"]["how"] == "load_from" and first["checkpoint"]["written_by"]["recipe"] == "single"
    assert second["from_step"] == 4 and second["checkpoint"]["how"] == "resume"
    assert second["checkpoint"]["resharded"] and second["checkpoint"]["written_by"]["world_size"] == 2


@pytest.mark.parametrize("name, first, writer", [("pipe", 4, "fsdp"), ("ddp", 5, "pipeline"), ("tp", 6, "ddp"),
                                                 ("last", 7, "ddp"), ("z2", 6, "ddp"), ("z3", 7, "zero2"),
                                                 ("cp", 6, "ddp"), ("cpread", 7, "ddp")])
def test_load_from_reshards_into_another_layout(chain, name, first, writer):
    runs, _ = chain
    _matches_reference(runs[name], runs["ref"], first)
    (segment,) = _segments(runs[name])
    assert segment["from_step"] == first and segment["checkpoint"]["written_by"]["recipe"] == writer
    assert segment["checkpoint"]["resharded"] and not segment["checkpoint"]["model_only"]


def test_context_parallel_writes_and_reads_the_universal_format(chain):
    """cp=2 reads ddp x2's checkpoint (its ranks hold whole parameters, split sequences), and single reads
    cp's: the layouts recorded are the ones that ran."""
    runs, _ = chain
    (read_by_cp,) = _segments(runs["cp"])
    (read_from_cp,) = _segments(runs["cpread"])
    assert read_by_cp["checkpoint"]["written_by"]["dims"]["cp"] == 1
    assert read_from_cp["checkpoint"]["written_by"]["dims"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 2,
                                                                "tp": 1}


def test_every_written_checkpoint_is_universal(chain):
    runs, _ = chain
    for run in runs.values():
        for step in (run / "checkpoints").iterdir():
            meta = json.loads((step / "meta.json").read_text())
            assert meta["format"] == "universal" and (step / "dcp" / ".metadata").is_file(), step


def _wb_here(capsys, *args: str) -> tuple[int, str, str]:
    """`wb *args` through the CLI's entry point in this process: (exit code, stdout, stderr)."""
    from gpu_workbench.cli.app import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name, writer", [("tp", "ddp tp=2 on 2 ranks"), ("z3", "zero3 on 2 ranks")])
def test_export_of_a_resharded_run_equals_single(chain, tmp_path, capsys, name, writer):
    from safetensors.torch import load_file

    runs, _ = chain
    out = tmp_path / "model.safetensors"
    code, stdout, stderr = _wb_here(capsys, "checkpoint", "export", str(runs[name]), "--format", "safetensors",
                                    "--out", str(out))
    assert code == 0, stderr
    assert f"step 8, written by {writer}" in stdout
    exported, reference = load_file(str(out)), final_params(runs["ref"])
    assert exported.keys() == reference.keys()
    assert max(float((exported[k] - reference[k]).abs().max()) for k in reference) < TOL
    code, _, stderr = _wb_here(capsys, "checkpoint", "export", str(runs["tp"]), "--format", "gguf", "--out", str(out))
    assert code == 2 and stderr.strip() == "wb: error: --format=gguf: choose safetensors or hf"


def test_inspect_and_verify(chain, tmp_path, capsys):
    runs, _ = chain
    code, out, _ = _wb_here(capsys, "checkpoint", "inspect", _step(runs["fsdp"], 4), "--recipe", "pipeline",
                            "--nproc", "2")
    assert code == 0
    assert "step 4 (64 samples seen), format universal, written by fsdp on 2 ranks" in out
    assert "state: good" in out and "a resume: pipeline on 2 ranks resumes it after resharding" in out
    code, out, _ = _wb_here(capsys, "checkpoint", "verify", str(runs["pipe"]))
    assert code == 0 and out.count(": good") == 4   # steps 5..8
    damaged = tmp_path / "step_000005"
    shutil.copytree(_step(runs["pipe"], 5), damaged)
    tensors = damaged / "dcp" / "__1_0.distcp"   # stage-rank 1's shards
    data = bytearray(tensors.read_bytes())
    data[100] ^= 0xFF
    tensors.write_bytes(bytes(data))
    code, out, _ = _wb_here(capsys, "checkpoint", "verify", str(damaged))
    assert code == 1 and out.strip() == f"{damaged}: damaged: dcp/__1_0.distcp fails its sha256 check"


def test_weights_only_start_a_fresh_optimizer(chain, tmp_path):
    """load_model_only: step 0 with a fresh schedule, on the step-4 weights (its first loss is theirs on batch 0)."""
    from gpu_workbench.parallel import RunConfig
    from gpu_workbench.parallel.checkpoint.universal import consolidated_weights
    from gpu_workbench.parallel.data import Dataset
    from gpu_workbench.parallel.models.transformer import GPT

    runs, _ = chain
    source = _step(runs["fsdp"], 4)
    stderr = _train_here(f"run_dir={tmp_path}", "steps=2", f"checkpoint.load_from={source}",
                         "checkpoint.load_model_only=true")
    assert "starting from the weights of" in stderr and "fresh optimizer, step 0" in stderr
    cfg = RunConfig.from_toml(TINY, BASE)
    model = GPT(cfg.model)
    model.load_state_dict(consolidated_weights(source, tied=True))
    x, y = Dataset(cfg).batch(0, list(range(cfg.global_batch)))
    with torch.no_grad():
        expected = float(model(x, y))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert records[0]["loss"] == pytest.approx(expected, abs=TOL)
    assert records[0]["lr"] == pytest.approx(cfg.optim.lr / cfg.optim.warmup_steps)   # the schedule starts over
    assert _segments(tmp_path)[0]["checkpoint"]["model_only"]


def test_what_cannot_change_is_refused_in_one_line(chain, tmp_path):
    runs, _ = chain
    before = (runs["fsdp"] / "config.json").read_bytes()
    with pytest.raises(UserError, match=r"^cannot resume .*step_000008: model.d_model is 32 in this run, 64 in"):
        _train_here(f"run_dir={runs['fsdp']}", "model.d_model=32")
    with pytest.raises(UserError, match=r"cannot start from checkpoint.load_from=.*: global_batch is 8 in this run"):
        _train_here(f"run_dir={tmp_path}", "global_batch=8", f"checkpoint.load_from={runs['pipe']}")
    assert (runs["fsdp"] / "config.json").read_bytes() == before   # the refused runs wrote nothing
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("reader, written, refusal", [
    ("zero2", "deepspeed", "it is in the deepspeed checkpoint format (written by fsdp), which recipe zero2 does not"),
    ("ddp", None, "it is in the pre-universal checkpoint format (written by fsdp), which recipe ddp does not"),
])
def test_a_format_the_reader_does_not_speak_is_refused(reader, written, refusal):
    from gpu_workbench.parallel import RunConfig, recipes
    from gpu_workbench.parallel.checkpoint.fingerprint import fingerprint
    from gpu_workbench.parallel.checkpoint.start import _fits

    cfg = RunConfig.from_toml(TINY, [f"recipe={reader}"])
    saved = fingerprint(RunConfig.from_toml(TINY, ["recipe=fsdp"]), 2)
    meta = {"recipe": "fsdp", "world_size": 2, "fingerprint": saved, **({"format": written} if written else {})}
    problem, _ = _fits(meta, cfg, 2, recipes.get(reader).checkpoint_format, model_only=False)
    assert problem.startswith(refusal)


@pytest.mark.parametrize("overrides, message", [
    (["checkpoint.load_model_only=true"], "checkpoint.load_model_only=true needs checkpoint.load_from="),
    (["checkpoint.load_from=/nonexistent/run"], "checkpoint.load_from: no such run directory or checkpoint folder"),
    (["checkpoint.load_from=.", "recipe=hogwild"], "checkpoint.load_from: recipe hogwild starts its own workers"),
])
def test_load_from_config_mistakes_name_the_field(overrides, message):
    from gpu_workbench.parallel import RunConfig, recipes

    with pytest.raises(UserError, match=message):
        recipes.resolve(RunConfig.from_toml(TINY, overrides).validate(), 2)


def test_load_from_a_folder_without_checkpoints_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint.load_from=.* is neither a run directory nor a step_\* "):
        _train_here(f"run_dir={tmp_path / 'new'}", f"checkpoint.load_from={tmp_path}")
    assert not (tmp_path / "new" / "config.json").exists()
