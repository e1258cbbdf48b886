"""The data pipeline's timings (BENCHMARKS.md, "Data pipeline"), each a ratio measured side by side in one run:

- `wb data prepare` throughput against Hugging Face `tokenizers`' own `encode_batch` on the same documents with
  the same number of workers (RAYON_NUM_THREADS for the library, processes for prepare); target >= 0.8x;
- the loader's tokens/s (the train step's own `dataset.batch` calls) against the tokens/s a llama-tiny ddp x2
  run consumes; target >= 20x, so the loader is never the bottleneck;
- llama-tiny's step time with data.document_mask against without it.

Timings on whatever cores the box has: recorded (extra_info, printed), not asserted. `make bench` runs them;
under `--benchmark-disable` (the normal suite) they skip.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import pytest

from tests.helpers.cli import ROOT, env

pytestmark = pytest.mark.slow
WORKERS = 2
LLAMA = str(ROOT / "configs" / "llama-tiny.toml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from gpu_workbench.parallel.tokens.corpus import build
    from gpu_workbench.parallel.tokens.prepare import prepare
    from gpu_workbench.parallel.tokens.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("bench-data")
    build(root / "docs.jsonl", 4.0, ["stdlib", "transformers"])
    texts = [json.loads(line)["text"] for line in (root / "docs.jsonl").read_text().splitlines()]
    train_bpe(texts[:2000], 2048, root / "tok")
    prepare([str(root / "docs.jsonl")], f"hf:{root / 'tok'}", root / "data", workers=WORKERS, progress=False)
    return root, texts


def _skip_unless_enabled(benchmark):
    if benchmark.disabled:
        pytest.skip("a timing: runs under `make bench` (--benchmark-enable)")


def test_prepare_vs_encode_batch(benchmark, corpus, tmp_path):
    _skip_unless_enabled(benchmark)
    from gpu_workbench.parallel.tokens.prepare import prepare

    root, texts = corpus
    benchmark.group = "data: wb data prepare vs tokenizers.encode_batch"
    began = time.perf_counter()
    prepare([str(root / "docs.jsonl")], f"hf:{root / 'tok'}", tmp_path / "out", workers=WORKERS, progress=False)
    prepare_s = time.perf_counter() - began
    code = ("import json, sys, time; from tokenizers import Tokenizer; t = Tokenizer.from_file(sys.argv[1]); "
            "texts = [json.loads(l)['text'] for l in open(sys.argv[2])]; b = time.perf_counter(); "
            "t.encode_batch(texts, add_special_tokens=False); print(time.perf_counter() - b)")
    done = subprocess.run([sys.executable, "-c", code, str(root / "tok" / "tokenizer.json"), str(root / "docs.jsonl")],
                          env=env(RAYON_NUM_THREADS=str(WORKERS), TOKENIZERS_PARALLELISM="true"),
                          capture_output=True, text=True, check=True)
    encode_s = float(done.stdout.strip())
    size = sum(len(t.encode()) for t in texts)
    result = {"mb": size / 1e6, "prepare_s": prepare_s, "encode_batch_s": encode_s, "ratio": encode_s / prepare_s}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(result)


def _train(run_dir, *overrides, nproc=1) -> list[dict]:
    from gpu_workbench.parallel.runtime.rundir import read_metrics

    cmd = [sys.executable, "-m", "gpu_workbench", "train", "--config", LLAMA, "--nproc", str(nproc),
           "--run-dir", str(run_dir), "progress=false", "checkpoint.every=0", "checkpoint.save_final=false",
           "eval.every=0", *overrides]
    subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=True)
    return read_metrics(run_dir)


def test_loader_vs_llama_tiny_ddp2(benchmark, corpus, tmp_path):
    _skip_unless_enabled(benchmark)
    from gpu_workbench.parallel import RunConfig
    from gpu_workbench.parallel.data import Dataset, micro_batches

    root, _ = corpus
    data = [f"data.path={root / 'data'}", "data.kind=tokens", "model.vocab_size=2048"]
    benchmark.group = "data: loader tokens/s vs llama-tiny ddp x2"
    metrics = _train(tmp_path / "ddp", *data, "recipe=ddp", "steps=30", nproc=2)
    need = statistics.median(m["tokens_per_s"] for m in metrics[5:])
    cfg = RunConfig.from_toml(LLAMA, [*data, "data.workers=0"])
    ds, mbs = Dataset(cfg), micro_batches(cfg.global_batch, cfg.micro_batch, 0, 1)
    began, steps = time.perf_counter(), 200
    for step in range(steps):
        for rows in mbs:
            ds.batch(step, rows)
    loader = steps * cfg.global_batch * cfg.model.seq_len / (time.perf_counter() - began)
    result = {"loader_tokens_per_s": loader, "ddp2_step_tokens_per_s": need, "ratio": loader / need}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(result)


def test_step_time_document_mask(benchmark, corpus, tmp_path):
    _skip_unless_enabled(benchmark)
    root, _ = corpus
    data = [f"data.path={root / 'data'}", "data.kind=tokens", "model.vocab_size=2048", "steps=30"]
    benchmark.group = "data: llama-tiny step time, document_mask on/off (single)"
    times = {}
    for mask in ("false", "true"):
        metrics = _train(tmp_path / mask, *data, f"data.document_mask={mask}")
        times[mask] = statistics.median(m["step_time_s"] for m in metrics[5:])
    result = {"without_s": times["false"], "with_s": times["true"], "ratio": times["true"] / times["false"]}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(result)


