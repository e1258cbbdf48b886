"""Every user mistake of issue 15 is ONE line on stderr (`wb: error: ...` naming the argument), exit 2,
and nothing written: each through the real CLI in a subprocess, the variants in-process (cheap)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from gpu_workbench.cli.app import main
from tests.helpers.cli import one_line
from tests.helpers.runs import ROOT, TINY, env, installed, wb


def main_error(capsys, *args: str) -> str:
    """`wb ARGS` in this process: exit 2 and the one stderr line."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("wb: error: "), err[-3000:]
    return err.strip()


@pytest.fixture
def a_file(tmp_path):
    """A regular file where a directory is expected; its bytes must survive the command."""
    path = tmp_path / "a_file"
    path.write_text("precious\n")
    return path


# --------------------------------------------------------------------------- a file where a dir goes
def test_compare_out_naming_a_file(a_file):
    done = wb("compare", "--recipes", "single", "--out", str(a_file))
    one_line(done, "--out", str(a_file), "is a file, not a directory")
    assert a_file.read_text() == "precious\n"


def test_report_out_naming_a_file_or_a_path_under_one(a_file, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")   # never read: --out is refused first
    for out in (a_file, a_file / "sub"):
        err = main_error(capsys, "report", str(run), "--out", str(out))
        assert "--out" in err and str(a_file) in err and "is a file, not a directory" in err, err
    assert a_file.read_text() == "precious\n"


def test_train_run_dir_naming_a_file(a_file, capsys):
    err = main_error(capsys, "train", "--config", TINY, "--run-dir", str(a_file), "steps=1", "progress=false")
    assert "--run-dir" in err and "is a file, not a directory" in err, err
    assert a_file.read_text() == "precious\n"


# ---------------------------------------------------------------------------------- wb ray submit
def test_ray_submit_where_nothing_listens():
    pytest.importorskip("ray", reason="Ray is not installed (the GPU image has none): see the test below")
    with socket.socket() as s:   # a free loopback port: bound, then released, so nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{s.getsockname()[1]}"
    done = wb("ray", "submit", "--address", address, "--", "echo", "hi", timeout=300)
    one_line(done, f"--address {address}: no Ray cluster answers there")


@pytest.mark.skipif(installed("ray"), reason="Ray is installed here")
def test_ray_commands_without_ray_are_one_line(capsys):
    """The GPU image has no Ray: `wb ray submit` and `wb train --launcher ray` say so, one line, exit 2."""
    err = main_error(capsys, "ray", "submit", "--", "echo", "hi")
    assert "wb ray submit needs Ray, which is not installed here" in err, err
    err = main_error(capsys, "train", "--launcher", "ray", "--recipe", "ddp", "--nproc", "2", "--config", TINY,
                     "steps=1")
    assert "--launcher ray needs Ray, which is not installed here" in err, err


@pytest.mark.skipif(installed("deepspeed"), reason="DeepSpeed is installed here")
def test_zero_recipe_without_deepspeed_is_one_line(tmp_path):
    """The GPU image has no DeepSpeed: a ZeRO recipe says so, one line from the launcher, exit 2."""
    done = wb("train", "--recipe", "zero2", "--nproc", "2", "--config", TINY, "--run-dir", str(tmp_path / "run"),
              "steps=1", "progress=false")
    one_line(done, "the ZeRO recipes (zero1/zero2/zero3) need DeepSpeed, which is not installed here")


# ------------------------------------------------------------------------- wb kernels ... --json
@pytest.mark.parametrize(("command", "work"), [
    (["check", "softmax", "--backend", "torch"], "kernel correctness"),
    (["bench", "softmax", "--quick"], "kernel benchmarks"),
    (["compile", "softmax", "--arch", "90", "--jobs", "1"], "ahead-of-time compile"),
])
def test_kernels_json_under_a_file_refused_before_the_work(command, work, a_file):
    done = wb("kernels", *command, "--json", str(a_file / "rows.json"))
    one_line(done, "--json", str(a_file), "is a file, not a directory")
    assert work not in done.stdout, done.stdout[-2000:]   # refused BEFORE the work: no table printed
    assert a_file.read_text() == "precious\n"


def test_kernels_json_naming_a_directory(tmp_path, capsys):
    err = main_error(capsys, "kernels", "check", "softmax", "--backend", "torch", "--json", str(tmp_path))
    assert "--json" in err and "is a directory" in err, err


# ----------------------------------------------------------------------- wb kernels check --backend
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, --backend triton is a real run")
def test_kernels_check_triton_without_cuda():
    done = wb("kernels", "check", "softmax", "--backend", "triton")
    one_line(done, "--backend triton", "CUDA", "--backend interpret")


@pytest.mark.parametrize("backend", ["auto", "cuda", "Triton", ""])
def test_kernels_check_unknown_backend(backend, capsys):
    err = main_error(capsys, "kernels", "check", "softmax", "--backend", backend)
    assert f"--backend={backend!r} is not a kernel backend; choose one of triton, interpret, torch" in err, err


def kernels_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m gpu_workbench.cli.kernels_cli ARGS`: the kernel commands alone (scripts/gpu_check.sh, the
    triton36 lane of the Makefile), which must end a mistake as `wb` does."""
    return subprocess.run([sys.executable, "-m", "gpu_workbench.cli.kernels_cli", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, needles", [
    (("check", "nosuchkernel"), ("nosuchkernel",)),
    (("check", "softmax", "--backend", "cuda"), ("--backend='cuda' is not a kernel backend",)),
    (("compile", "softmax", "--arch", "75"), ("--arch 75 is not supported",)),
])
def test_standalone_kernels_cli_mistake_is_one_line(args, needles):
    one_line(kernels_cli(*args), *needles)


# ------------------------------------------------------------------------- config, summary.json
def test_config_path_that_is_a_directory(tmp_path, capsys):
    done = wb("train", "--config", str(tmp_path))
    one_line(done, f"config file {tmp_path} is a directory")
    err = main_error(capsys, "compare", "--recipes", "single", "--config", str(tmp_path),
                     "--out", str(tmp_path / "cmp"))
    assert f"--config {tmp_path} is a directory" in err, err
    assert not (tmp_path / "cmp").exists()


def test_binary_config_file_and_demo_out_naming_a_file(tmp_path, a_file, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    err = main_error(capsys, "train", "--config", str(binary))
    assert f"config file {binary} is not a text (TOML) file" in err, err
    err = main_error(capsys, "demo", "--out", str(a_file))
    assert "--out" in err and "is a file, not a directory" in err, err
    assert a_file.read_text() == "precious\n"


def test_report_garbled_summary_names_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"recipe": "ddp", "steps": ')   # cut off mid-write
    done = wb("report", str(run), "--out", str(tmp_path / "report"))
    one_line(done, f"{run / 'summary.json'}: not valid JSON")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(("name", "text", "where"), [
    ("config.json", "[1, 2", "config.json: not valid JSON"),
    ("config.json", "[1, 2]", "config.json: a JSON object is expected, got list"),
    ("metrics.jsonl", '{"step": 0, "loss": 4.1}\n{"step": 1, "lo', "metrics.jsonl:2: not valid JSON"),
])
def test_report_garbled_run_files_name_the_file(name, text, where, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _minimal_summary(run)
    (run / name).write_text(text)
    err = main_error(capsys, "report", str(run), "--out", str(tmp_path / "report"))
    assert f"{run / where}" in err, err


def _minimal_summary(run) -> None:
    from gpu_workbench.parallel.runtime.summary import RunSummary

    RunSummary(recipe="single", world_size=1, dp=1, steps=2, final_loss=4.0, tokens_per_s=100.0, n_params=10,
               elapsed_s=1.0, micro_batch=4, global_batch=16, tokens_per_step=512, skipped_steps=0, device="cpu",
               precision="fp32", run_dir=str(run)).write(run / "summary.json")


# ------------------------------------------------------------------------------------ wb compare
def test_compare_recipes_naming_nothing(tmp_path, capsys):
    done = wb("compare", "--recipes", ",", "--out", str(tmp_path / "cmp"))
    one_line(done, "--recipes names no recipe")
    for text in ("", " , ,"):
        assert "--recipes names no recipe" in main_error(capsys, "compare", "--recipes", text, "--out",
                                                         str(tmp_path / "cmp"))
    assert not (tmp_path / "cmp").exists()


def test_compare_misspelt_override_launches_nothing(tmp_path):
    out = tmp_path / "cmp"
    done = wb("compare", "--recipes", "single,ddp", "--out", str(out), "optim.lrr=1e-3")
    one_line(done, "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)")
    assert "training" not in done.stdout and "failed" not in done.stdout, done.stdout[-2000:]
    assert not out.exists()


def test_compare_validates_each_recipe_with_the_nproc_it_gets(tmp_path, capsys):
    """single gets 1 process and global_batch 12 suits it; ddp on 2 cannot split 12 into 4 x 2: refused
    before single is launched."""
    out = tmp_path / "cmp"
    err = main_error(capsys, "compare", "--recipes", "single,ddp", "--nproc", "2", "--out", str(out),
                     "global_batch=12")
    assert "ddp (--nproc 2): global_batch (12) must be divisible by micro_batch (4) x data-parallel degree (2)" \
        in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------ wb profile
def test_profile_a_command_that_does_not_exist(capsys):
    err = main_error(capsys, "profile", "torch", "--", "no-such-command-wb15")
    assert "cannot run the command after --: no-such-command-wb15 (No such file or directory)" in err, err


# ------------------------------------------------------------------------- wb sample, wb checkpoint export
@pytest.mark.parametrize(("option", "needle"), [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-k", "-3"], "--top-k must be >= 1"),
])
def test_sample_options_out_of_range(option, needle, tmp_path, capsys):
    err = main_error(capsys, "sample", str(tmp_path), "--prompt", "3 4", *option)
    assert needle in err, err


def test_sample_empty_prompt_through_the_cli(tmp_path):
    one_line(wb("sample", str(tmp_path), "--prompt", ""), "--prompt is empty")
    one_line(wb("sample", str(tmp_path), "--prompt", "3", "--temperature", "nan"), "--temperature")


def test_export_refuses_to_replace_a_file_without_force(a_file, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()   # never read: --out is refused first
    err = main_error(capsys, "checkpoint", "export", str(run), "--out", str(a_file))
    assert f"--out {a_file} exists; pass --force to replace it" in err, err
    assert a_file.read_text() == "precious\n"


def test_export_with_force_replaces_the_file(tmp_path, capsys):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    trained = wb("train", "--config", TINY, "--run-dir", str(run), "steps=1", "checkpoint.every=1", "progress=false",
                 "model.d_model=32", "model.n_layers=1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "model.safetensors"
    out.write_text("precious\n")
    assert "exists; pass --force" in main_error(capsys, "checkpoint", "export", str(run), "--out", str(out))
    with pytest.raises(SystemExit) as exit_:
        main(["checkpoint", "export", str(run), "--out", str(out), "--force"])
    assert not exit_.value.code and "tok_emb.weight" in load_file(str(out))


# ------------------------------------------------- wb train refusals: one line at every process count
# Each is checked in the launching process, before torchrun starts workers: the same one line and exit 2
# under --nproc 1 (in this process) and --nproc 2 (which would otherwise print it per rank, then torchrun's
# report). In-process through the CLI's entry point; capfd also sees what a torchrun child would print.
FAST = ["--config", TINY, "--recipe", "ddp", "progress=false", "model.d_model=32", "model.n_layers=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step ddp run with a checkpoint after each step: the run every refusal below resumes."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    done = wb("train", *FAST, "--run-dir", str(run_dir), "steps=2", "checkpoint.every=1")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def train_refused(capfd, *args: str) -> str:
    """`wb train ARGS` in this process: exit 2, and one `wb: error:` line (no traceback) on fd 2."""
    import torch.distributed as dist

    capfd.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["train", *args])
    finally:
        if dist.is_initialized():   # the one-rank group of an --nproc 1 ddp run in this process
            dist.destroy_process_group()
    err = capfd.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    assert err.count("wb: error:") == 1 and "Traceback" not in err and err.count("\n") == 1, err[-3000:]
    return err.strip()


def _snapshot(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


RESUME_REFUSALS = [
    (["seed=1"], "seed is 1 in this run, 0 in the checkpoint"),
    (["model.d_model=16"], "model.d_model is 16 in this run, 32 in the checkpoint"),
    (["model.arch=llama"], "model.arch is 'llama' in this run, 'gpt2' in the checkpoint"),   # a gpt2 run into llama
    (["steps=1"], "it holds 2 steps, more than steps=1"),
]


@pytest.mark.parametrize("nproc", ["1", "2"])
@pytest.mark.parametrize(("extra", "words"), RESUME_REFUSALS, ids=[e[0] for e, _ in RESUME_REFUSALS])
def test_resume_refusal_is_one_line_at_every_nproc(nproc, extra, words, trained, capfd):
    before = _snapshot(trained)
    err = train_refused(capfd, *FAST, "--nproc", nproc, "--run-dir", str(trained), "steps=3", *extra)
    assert err.startswith(f"wb: error: cannot resume {trained / 'checkpoints'}") and words in err, err
    assert _snapshot(trained) == before   # nothing written, the lock released


def test_resume_refusal_under_ray_is_one_line_before_ray_starts(trained, capfd):
    pytest.importorskip("ray", reason="Ray is not installed (the GPU image has none): --launcher ray refuses first")
    err = train_refused(capfd, *FAST, "--launcher", "ray", "--nproc", "2", "--run-dir", str(trained), "steps=3",
                        "seed=1")
    assert "cannot resume" in err and "seed is 1 in this run, 0 in the checkpoint" in err, err


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_load_from_refusals_are_one_line_at_every_nproc(nproc, trained, tmp_path, capfd):
    new = str(tmp_path / "new")
    err = train_refused(capfd, *FAST, "--nproc", nproc, "--run-dir", new, f"checkpoint.load_from={trained}",
                        "model.d_model=16")
    assert f"cannot start from checkpoint.load_from={trained / 'checkpoints' / 'step_000002'}: model.d_model is " \
           "16 in this run, 32 in the checkpoint" in err, err
    err = train_refused(capfd, *FAST, "--nproc", nproc, "--run-dir", new, f"checkpoint.load_from={tmp_path}")
    assert f"checkpoint.load_from={tmp_path} is neither a run directory nor a step_* checkpoint folder" in err, err
    assert not (tmp_path / "new" / "config.json").exists()


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_config_and_run_dir_refusals_are_one_line_at_every_nproc(nproc, tmp_path, capfd):
    err = train_refused(capfd, *FAST, "--nproc", nproc, "--run-dir", str(tmp_path / "run"), "stepz=5")
    assert "unknown config key 'stepz' (did you mean 'steps'?)" in err, err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious\n")   # a folder of the user's own
    err = train_refused(capfd, *FAST, "--nproc", nproc, "--run-dir", str(tmp_path / "mine"), "steps=1")
    assert "is not empty and is not a wb run directory" in err, err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_log_dir_naming_a_file_is_one_line_before_torchrun(nproc, a_file, tmp_path, capfd):
    err = train_refused(capfd, *FAST, "--nproc", nproc, "--log-dir", str(a_file), "--run-dir",
                        str(tmp_path / "run"), "steps=1")
    assert f"--log-dir {a_file} is a file, not a directory" in err, err
    assert a_file.read_text() == "precious\n" and not (tmp_path / "run").exists()


def test_a_refusal_under_torchrun_is_one_line_through_the_real_cli(trained):
    """A real `wb` process at --nproc 2: llama's refusal used to print per rank, then torchrun's traceback
    (one rank dying by SIGABRT), exit 1."""
    one_line(wb("train", *FAST, "--nproc", "2", "--run-dir", str(trained), "steps=3", "model.arch=llama"),
             "cannot resume", "model.arch is 'llama' in this run, 'gpt2' in the checkpoint")


def test_a_workers_user_error_is_printed_once_by_the_launcher(capfd, monkeypatch):
    """A mistake only the workers find (here: a config the launcher never checked) reaches the user as
    rank 0's one line, exit 2, without torchrun's failure report."""
    from gpu_workbench.cli.train_cli import _run_workers
    from gpu_workbench.cluster.torchrun import torchrun_command
    from gpu_workbench.parallel.runtime.errors import UserError

    command = torchrun_command(["wb", "train", "--config", TINY, "stepz=5"], nproc_per_node=2,
                               agent="gpu_workbench.cluster.agent")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))   # the workers import this checkout
    capfd.readouterr()
    with pytest.raises(UserError, match=r"^unknown config key 'stepz' \(did you mean 'steps'\?\)$"):
        _run_workers(command, lock_token="unused")
    out, err = capfd.readouterr()
    assert err == "" and "Traceback" not in out, err[-3000:]
