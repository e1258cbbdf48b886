"""Bad Hugging Face input is one line naming the file or key, exit 2 (wb hf inspect, wb train
checkpoint.load_from=hf:..., wb checkpoint export --format hf), in this process."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers.hf_models import save
from tests.workbench.test_user_errors import main_error

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save("llama", tmp_path_factory.mktemp("hf") / "llama")


def variant(llama, tmp_path, config: dict | None = None, drop: str = "", weights: bytes | None = None):
    """A copy of the tiny llama directory with config.json's keys changed (None deletes one), a file dropped,
    or model.safetensors replaced by `weights`."""
    out = tmp_path / "variant"
    shutil.copytree(llama, out)
    if config:
        raw = json.loads((out / "config.json").read_text())
        raw.update(config)
        (out / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    if drop:
        (out / drop).unlink()
    if weights is not None:
        (out / "model.safetensors").write_bytes(weights)
    return out


def test_inspect_says_what_the_project_builds(llama, capsys):
    from gpu_workbench.cli.app import main

    with pytest.raises(SystemExit) as exit_:
        main(["hf", "inspect", str(llama)])
    out = capsys.readouterr().out
    assert not exit_.value.code and "LlamaForCausalLM" in out and "model.arch=llama" in out, out
    assert "head_dim 8" in out and "llama3 x8" in out, out


@pytest.mark.parametrize(("change", "needle"), [
    (dict(drop="config.json"), "config.json not found"),
    (dict(drop="model.safetensors"), "no model.safetensors or model.safetensors.index.json"),
    (dict(weights=b"not a safetensors file"), "model.safetensors is unreadable"),
    (dict(config={"intermediate_size": 96}), "tensor model.layers.0.mlp.gate_proj.weight has shape [80, 48], but "
                                             "config.json says [96, 48]"),
    (dict(config={"model_type": "mistral"}), "model_type = 'mistral' is not in the model registry"),
    (dict(config={"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}), "rope_scaling.rope_type = 'yarn' is "
                                                                             "not supported"),
    (dict(config={"sliding_window": 4096}), "sliding_window = 4096 is not supported"),
    (dict(config={"hidden_act": "gelu"}), "hidden_act = 'gelu' is not supported"),
    (dict(config={"num_hidden_layers": None}), "lacks 'num_hidden_layers'"),
])
def test_bad_directory_is_one_line(llama, tmp_path, capsys, change, needle):
    err = main_error(capsys, "hf", "inspect", str(variant(llama, tmp_path, **change)))
    assert needle in err, err


def test_config_json_that_is_not_json(llama, tmp_path, capsys):
    out = variant(llama, tmp_path)
    (out / "config.json").write_text("{not json")
    assert "config.json is unreadable (JSONDecodeError" in main_error(capsys, "hf", "inspect", str(out))


def test_a_shard_the_index_names_is_missing(llama, tmp_path, capsys):
    out = variant(llama, tmp_path)
    (out / "model.safetensors").rename(out / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    err = main_error(capsys, "hf", "inspect", str(out))
    assert "names the shard model-00002-of-00002.safetensors, which is missing" in err, err


def test_train_refusals(llama, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    train = ["train", "--run-dir", str(tmp_path / "new"), "steps=1", "progress=false"]
    err = main_error(capsys, *train, f"checkpoint.load_from=hf:{llama}", "model.d_model=64")
    assert "model.d_model=64 disagrees with" in err and "(48)" in err, err
    err = main_error(capsys, *train, f"checkpoint.load_from=hf:{run}")
    assert "is a gpu-workbench run or checkpoint, not a Hugging Face model directory" in err, err
    err = main_error(capsys, *train, f"checkpoint.load_from={llama}", "model.vocab_size=97")
    assert f"is a Hugging Face model directory, not a run: write checkpoint.load_from=hf:{llama}" in err, err


def test_export_onto_an_existing_directory_needs_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    err = main_error(capsys, "checkpoint", "export", str(tmp_path), "--format", "hf", "--out", str(out))
    assert "exists and is not empty; pass --force" in err, err
    assert (out / "config.json").read_text() == "{}"
    assert "--max-shard-size='5 potatoes'" in main_error(capsys, "checkpoint", "export", str(tmp_path), "--format",
                                                          "hf", "--out", str(tmp_path / "x"), "--max-shard-size",
                                                          "5 potatoes")
