"""Hugging Face in, train, Hugging Face out: a tiny random LlamaForCausalLM (save_pretrained, no download)
starts `fsdp` x2 and `ddp` x2 with tp.degree=2 (one torchrun launch), 5 steps each, equal to `single` started
from it; `wb checkpoint export --format hf` of each is loaded by transformers' from_pretrained with no
missing, unexpected or mismatched keys, and gives the project's logits of the final checkpoint. The
source's tokenizer.json travels with the run: `wb sample` encodes and decodes with it, export hands it back."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.cli import wb
from tests.helpers.hf_models import WORDS, add_tokenizer, save
from tests.helpers.runs import assert_matches_single, torchrun

pytest.importorskip("transformers")
STEPS = 5
LAYOUTS = {"fsdp": ["recipe=fsdp"], "ddp_tp": ["recipe=ddp", "tp.degree=2"]}


def overrides(hf_dir, run_dir) -> list[str]:
    return [f"checkpoint.load_from=hf:{hf_dir}", f"steps={STEPS}", f"checkpoint.every={STEPS}", "progress=false",
            "checkpoint.save_final=true", f"run_dir={run_dir}", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from gpu_workbench.parallel import RunConfig, train

    root = tmp_path_factory.mktemp("hf_roundtrip")
    hf_dir = add_tokenizer(save("llama", root / "hf", vocab_size=96))
    train(RunConfig.from_toml(None, overrides(hf_dir, root / "single")))
    torchrun(2, [(None, overrides(hf_dir, root / name) + extra) for name, extra in LAYOUTS.items()])
    return root


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_started_from_hf_matches_single(runs, layout):
    assert_matches_single(runs / layout, runs / "single", STEPS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_loads_in_transformers_with_the_same_logits(runs, layout):
    import transformers as T

    from gpu_workbench.parallel.tools.sampling import load_model

    out = runs / f"{layout}_hf"
    if layout == "fsdp":   # through the CLI once; in-process for the other (a CLI start costs seconds here)
        done = wb("checkpoint", "export", str(runs / layout), "--format", "hf", "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
    else:   # sharded: an index and several files, read back by hf: below
        from gpu_workbench.parallel.tools import hf_export

        hf_export.export(runs / layout, out, max_shard_size="40KB")
        assert len(list(out.glob("model-0000*-of-0000*.safetensors"))) > 1
    theirs, info = T.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    ours, _, _ = load_model(runs / layout)
    ids = torch.randint(0, 96, (2, 31), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(ids), theirs.eval()(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    if layout != "fsdp":   # the sharded export read back through hf: gives the same model
        from gpu_workbench.parallel.checkpoint import hf_load
        from gpu_workbench.parallel.models.transformer import build

        torch.manual_seed(123)
        again = build(ours.cfg).eval()   # fresh random weights, then the export's
        hf_load.load_module(again, out, again.cfg)
        with torch.no_grad():
            assert torch.equal(again(ids), a)


def test_sample_uses_the_runs_hugging_face_tokenizer(runs, capsys):
    from gpu_workbench.cli.app import main

    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(runs / "single"), "--prompt", "the cat", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    text = captured.out.split()
    assert not exit_.value.code and text[:2] == ["the", "cat"] and len(text) == 6, (text, captured.err[-2000:])
    assert all(word in WORDS for word in text), text
    assert (runs / "single" / "hf" / "tokenizer.json").is_file()
    if (runs / "fsdp_hf").is_dir():   # written by the export test above
        assert (runs / "fsdp_hf" / "tokenizer.json").is_file()
