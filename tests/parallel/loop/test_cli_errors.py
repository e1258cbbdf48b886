"""`wb train` config mistakes: one line on stderr naming the field, exit code 2, before any process
starts. Through the CLI's entry point in-process (fast), and two through a real subprocess."""

from __future__ import annotations

import pytest

from gpu_workbench.cli.app import main
from tests.helpers.runs import TINY, refused_in_process, wb

BAD = [
    (["optim.lrr=1e-3"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["stepz=3"], "unknown config key 'stepz' (did you mean 'steps'?)"),
    (["steps=ten"], "steps must be int"),
    (["progress=maybe"], "progress must be a bool"),
    (["--nproc", "2", "--recipe", "ddp", "global_batch=12", "micro_batch=4"],
     "global_batch (12) must be divisible by micro_batch (4) x data-parallel degree (2)"),
    (["--recipe", "zero2", "zero.stage=5"], "zero.stage must be 0, 1, 2 or 3"),
    (["--recipe", "zero3", "zero.stage=2"], "zero.stage=2 contradicts recipe=zero3"),
    (["--recipe", "single", "--nproc", "2"], "recipe 'single' runs on exactly 1 process(es), got world size"),
    (["--recipe", "zero4"], "recipe: unknown recipe 'zero4' (did you mean"),
    (["--nproc", "0", "--recipe", "ddp"], "world size (--nproc) must be >= 1"),
    # --nproc MIN:MAX: an elastic Ray Train job only; every world size in the range is checked first
    (["--nproc", "1:2", "--recipe", "ddp"], "--nproc 1:2: MIN:MAX (elastic) needs --launcher ray"),
    (["--nproc", "two", "--recipe", "ddp"], "--nproc must be an integer N or MIN:MAX, got 'two'"),
    (["--launcher", "ray", "--nproc", "2:1", "--recipe", "ddp"], "--nproc 2:1: needs 1 <= MIN <= MAX"),
    (["--launcher", "ray", "--nproc", "1:3", "--recipe", "ddp", "global_batch=8", "micro_batch=2"],
     "global_batch (8) must be divisible by micro_batch (2) x data-parallel degree (3)"),
    (["model.n_heads=5"], "model.d_model (64) must be divisible by model.n_heads (5)"),
    (["precision=fp12"], "precision must be one of 'fp32' | 'bf16' | 'fp16' | 'fp8', got 'fp12'"),
    (["steps"], "override 'steps' must look like key=value"),
    (["optim=3"], "config key 'optim' is a section"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["data.kind=bytes"], "data.path is required when data.kind = 'bytes'"),
    (["--recipe", "ddp", "--deepspeed", TINY], "zero.config_file (--deepspeed) needs a zero1/zero2/zero3 recipe"),
    (["micro_batch=0"], "micro_batch must be > 0"),
    (["--recipe", "async-ps", "--nproc", "2", "--timeline"],
     "--timeline (profiling.timeline) does not work with recipe=async-ps: its Ray parameter-server workers"),
    (["--recipe", "hogwild", "--nproc", "2", "profiling.timeline=true"],
     "--timeline (profiling.timeline) does not work with recipe=hogwild"),
    # tensor parallelism: sizes it splits, the world size, the recipes it does not compose with
    (["--recipe", "ddp", "--nproc", "4", "tp.degree=4", "model.n_heads=2"],
     "model.n_heads (2) must be divisible by tp.degree (4)"),
    (["--recipe", "ddp", "--nproc", "2", "tp.degree=2", "model.vocab_size=63"],
     "model.vocab_size (63) must be divisible by tp.degree (2)"),
    (["--recipe", "ddp", "--nproc", "2", "tp.degree=2", "model.d_ff=255"],
     "model.d_ff (255) must be divisible by tp.degree (2)"),
    (["--recipe", "ddp", "--nproc", "3", "tp.degree=2"], "tp.degree 2 does not divide world size (--nproc) 3"),
    (["--recipe", "fsdp", "--nproc", "2", "tp.degree=2", "tp.sequence_parallel=true", "model.seq_len=31"],
     "model.seq_len (31) must be divisible by tp.degree (2) with tp.sequence_parallel = true"),
    (["--recipe", "ddp", "--nproc", "2", "tp.degree=2", "model.fused_head_loss=true"],
     "model.fused_head_loss does not work with tp.degree > 1"),
    (["--recipe", "single", "tp.degree=2"], "recipe=single: runs one process; use --recipe ddp (or fsdp) with --nproc"),
    (["--recipe", "zero2", "--nproc", "2", "tp.degree=2"], "recipe=zero2: DeepSpeed's ZeRO partitions flat"),
    (["--recipe", "zero3", "--nproc", "2", "tp.degree=2"], "recipe=zero3: DeepSpeed's ZeRO partitions flat"),
    (["--recipe", "async-ps", "--nproc", "2", "tp.degree=2"], "recipe=async-ps: the parameter server holds"),
    (["--recipe", "hogwild", "--nproc", "2", "tp.degree=2"], "recipe=hogwild: hogwild shares one whole model"),
    (["--recipe", "diloco", "--nproc", "2", "tp.degree=2"], "recipe=diloco: its parameter averaging"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_one_line_exit_2(args, message, capsys):
    refused_in_process(capsys, args, message)


def test_missing_and_malformed_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    for path, message in [(tmp_path / "nope.toml", "config file not found"), (bad, "is not valid TOML")]:
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--config", str(path)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_deepspeed_json_checked_against_config(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}')
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", TINY, "--recipe", "zero2", "--nproc", "2", "--deepspeed", str(ds)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_micro_batch_size_per_gpu=8 disagrees with the run config" in err, err


def test_real_cli_process():
    """The installed entry point, for real: the same one line and exit 2, no traceback."""
    done = wb("train", "--config", TINY, "--recipe", "ddp", "--nproc", "2", "global_batch=10")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "wb: error: global_batch (10) must be divisible by micro_batch (4) x data-parallel degree (2)"]
    done = wb("train", "--config", TINY, "model.vocab=3")
    assert done.returncode == 2 and "did you mean 'model.vocab_size'" in done.stderr
    assert "Traceback" not in done.stderr
