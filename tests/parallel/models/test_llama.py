"""The llama architecture (model.arch = "llama"), held-out evaluation and sampling.

Units: rotary embeddings against the complex-number formulation; the whole llama forward against an
independent float64 reference written here; grouped-query attention reaching kernels.attention; KV-cached
decoding against recomputing the whole sequence. End to end (the nanotron pattern): ddp, fsdp, pipeline
1f1b and ddp x tp with llama equal `single` per step, their held-out losses too, in one 2-rank launch;
evaluation leaves the trajectory unchanged; `wb sample` gives the same greedy text from a single and an
fsdp run; on bytes, the held-out loss falls.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.models.transformer import GPT, rotate
from gpu_workbench.parallel.runtime.rundir import read_evals
from gpu_workbench.parallel.tools import sampling
from tests.helpers.runs import ROOT, TINY, losses, rel, torchrun, train_single, wb

LLAMA = ["model.arch=llama", "model.n_kv_heads=2", "steps=6", "progress=false", "checkpoint.every=3",
         "eval.every=2", "eval.batches=2"]


def _cfg(*overrides: str):
    return RunConfig.from_toml(TINY, [*LLAMA, *overrides]).model


# ---- units -------------------------------------------------------------------------------------
def test_rotary_equals_the_complex_formulation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64)
    positions = torch.tensor([5, 6, 7, 8, 20, 21, 40])   # offsets, as a context-parallel rank holds
    freq = 1e4 ** (-torch.arange(0, 10, 2, dtype=torch.float64) / 10)
    turn = torch.polar(torch.ones(7, 5, dtype=torch.float64), positions[:, None].double() * freq)
    want = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (5, 2)).contiguous()) * turn).flatten(-2)
    torch.testing.assert_close(rotate(x, positions, 1e4), want, rtol=1e-12, atol=1e-12)


def _reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Llama written out from its definition, reading the model's weights: RMSNorm, complex rotary
    embeddings, GQA by repeating key/value heads, explicit masked softmax, SwiGLU, tied head."""
    cfg, p = model.cfg, dict(model.named_parameters())
    B, T = idx.shape
    hd, rep = cfg.d_model // cfg.n_heads, cfg.n_heads // cfg.n_kv_heads
    freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    turn = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.arange(T).double()[:, None] * freq)

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(t):   # (B, T, H, hd)
        return torch.view_as_real(torch.view_as_complex(t.unflatten(-1, (hd // 2, 2))) * turn[:, None]).flatten(-2)

    x = p["tok_emb.weight"][idx]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layers):
        w = lambda name, i=i: p[f"blocks.{i}.{name}.weight"]   # noqa: E731
        h = rms(x, w("ln1"))
        q = rope((h @ w("attn.q").T).view(B, T, cfg.n_heads, hd)).transpose(1, 2)
        k = rope((h @ w("attn.k").T).view(B, T, cfg.n_kv_heads, hd)).transpose(1, 2).repeat_interleave(rep, 1)
        v = (h @ w("attn.v").T).view(B, T, cfg.n_kv_heads, hd).transpose(1, 2).repeat_interleave(rep, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~mask, float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1) @ w("attn.proj").T
        h = rms(x, w("ln2"))
        x = x + (F.silu(h @ w("mlp.gate").T) * (h @ w("mlp.up").T)) @ w("mlp.down").T
    return rms(x, p["ln_f.weight"]) @ p["tok_emb.weight"].T


def test_llama_forward_equals_an_independent_reference(monkeypatch):
    import gpu_workbench.parallel.models.transformer as model_module

    seen = []
    real = model_module.kernels.attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(model_module.kernels, "attention", spy)
    cfg = _cfg("model.n_heads=6", "model.n_kv_heads=3", "model.d_model=48")
    torch.manual_seed(1)
    model = GPT(cfg).double()
    for name, t in model.named_parameters():   # RMSNorm weights start at 1: give them values too
        if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
            torch.nn.init.uniform_(t, 0.5, 1.5)
    idx = torch.randint(0, cfg.vocab_size, (2, 13))
    torch.testing.assert_close(model(idx), _reference_logits(model, idx), rtol=1e-9, atol=1e-9)
    assert seen == [(6, 3)] * cfg.n_layers   # GQA through the project's kernel: 6 query heads on 3 kv heads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cached_decoding_equals_recomputing(arch):
    cfg = _cfg(f"model.arch={arch}", "model.n_kv_heads=" + ("2" if arch == "llama" else "0"))
    torch.manual_seed(2)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    for temperature, top_k in ((0.0, 0), (1.0, 8)):
        cached = sampling.generate(model, prompt, 20, temperature, top_k, seed=3)
        full = sampling.generate(model, prompt, 20, temperature, top_k, seed=3, use_cache=False)
        assert torch.equal(cached, full), (temperature, cached, full)
    cache = [sampling.LayerCache() for _ in model.blocks]
    with torch.no_grad():   # logits of each decoded position, one token at a time, against one full pass
        stepwise = torch.cat([model(cached[:, t:t + 1], positions=torch.tensor([t]), cache=cache)
                              for t in range(cached.shape[1])], dim=1)
        torch.testing.assert_close(stepwise, model(cached), rtol=1e-5, atol=1e-5)


def test_sampling_mistakes_name_the_argument(tmp_path):
    from gpu_workbench.parallel.runtime.errors import UserError

    with pytest.raises(UserError, match="RUN_DIR .* no config.json"):
        sampling.run_config(tmp_path)
    cfg = RunConfig.from_toml(TINY, [])
    with pytest.raises(UserError, match="--prompt .* token id 99"):
        sampling.encode(cfg, "1 99")
    with pytest.raises(UserError, match="--prompt .* synthetic"):
        sampling.encode(cfg, "hello")
    with pytest.raises(UserError, match="--max-new-tokens"):
        sampling.check_length(32, 3, 30)


# ---- end to end ----------------------------------------------------------------------------------
RECIPES = {"ddp": ["recipe=ddp"], "fsdp": ["recipe=fsdp"], "pipeline": ["recipe=pipeline", "pp.schedule=1f1b"],
           "ddp-tp": ["recipe=ddp", "tp.degree=2"]}


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):

    root = tmp_path_factory.mktemp("llama")
    dirs = {name: root / name for name in [*RECIPES, "single", "single-no-eval"]}
    train_single(dirs["single"], LLAMA)
    train_single(dirs["single-no-eval"], [*LLAMA, "eval.every=0"])
    torchrun(2, [(TINY, [*LLAMA, *o, f"run_dir={dirs[n]}"]) for n, o in RECIPES.items()])
    return dirs


@pytest.mark.parametrize("name", list(RECIPES))
def test_llama_recipe_matches_single(name, llama_runs):
    ref, got = losses(llama_runs["single"]), losses(llama_runs[name])
    assert len(got) == len(ref) == 6 and ref[-1] < ref[0]
    worst = max(rel(a, b) for a, b in zip(got, ref, strict=True))
    assert worst < 1e-5, f"{name}: {got} vs single {ref}"
    evals, ref_evals = read_evals(llama_runs[name]), read_evals(llama_runs["single"])
    assert [e["step"] for e in evals] == [e["step"] for e in ref_evals] == [1, 3, 5]
    assert max(rel(a["val_loss"], b["val_loss"]) for a, b in zip(evals, ref_evals, strict=True)) < 1e-5


def test_evaluation_leaves_the_trajectory_unchanged(llama_runs):
    from tests.helpers.runs import summary

    assert losses(llama_runs["single"]) == losses(llama_runs["single-no-eval"])   # bitwise
    assert read_evals(llama_runs["single-no-eval"]) == []
    assert summary(llama_runs["single-no-eval"])["final_val_loss"] is None
    assert summary(llama_runs["single"])["final_val_loss"] == read_evals(llama_runs["single"])[-1]["val_loss"]


def test_wb_sample_is_the_same_from_single_and_fsdp(llama_runs):
    outs = []
    for name in ("single", "fsdp"):
        done = wb("sample", str(llama_runs[name]), "--prompt", "3 1 4 1 5", "--max-new-tokens", "12")
        assert done.returncode == 0, done.stderr
        assert "step_000006" in done.stderr   # the newest checkpoint
        outs.append(done.stdout.split())
    assert outs[0] == outs[1] and len(outs[0]) == 17 and outs[0][:5] == ["3", "1", "4", "1", "5"]


def test_held_out_loss_falls_on_bytes(tmp_path):
    from gpu_workbench.parallel import train

    corpus = tmp_path / "corpus.bin"
    assert wb("data", "prepare", str(ROOT / "docs" / "ARCHITECTURE.md"), "--out", str(corpus)).returncode == 0
    train(RunConfig.from_toml(str(ROOT / "configs" / "llama-tiny.toml"), [
        "data.kind=bytes", f"data.path={corpus}", "steps=30", "eval.every=10", "progress=false",
        "checkpoint.every=0", f"run_dir={tmp_path / 'run'}"]))
    val = [e["val_loss"] for e in read_evals(tmp_path / "run")]
    # falling at every evaluation, and well below guessing a byte, ln(256) = 5.55 nats
    assert len(val) == 3 and val[0] > val[1] > val[2] and val[-1] < math.log(256) - 2, val


def test_report_shows_the_held_out_loss(llama_runs, tmp_path):
    from gpu_workbench.cli.report import build_report, load_run, runs_table

    rows = runs_table([load_run(llama_runs["single"]), load_run(llama_runs["single-no-eval"])])
    column = rows[0].index("final held-out loss")
    assert float(rows[1][column]) == pytest.approx(read_evals(llama_runs["single"])[-1]["val_loss"], rel=1e-5)
    assert rows[2][column] == "—"
    report = build_report([llama_runs["single"]], tmp_path).read_text()
    assert "final held-out loss" in report and (tmp_path / "loss_vs_step.png").is_file()
