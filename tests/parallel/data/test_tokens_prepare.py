"""`wb data tokenizer train` and `wb data prepare`: a real byte-level BPE (Hugging Face `tokenizers`), real
text, JSON lines and Parquet (pyarrow) in, memory-mapped shards whose documents decode back to the sources,
reruns that tokenize only what changed, and one line for each bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.cli import one_line, wb

TEXTS = ["The quick brown fox jumps over the lazy dog.\nIt was not amused.\n",
         "Numbers 12345 and symbols {}[] and unicode: café, naïve, 日本語.\n", "", "x"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpu_workbench.parallel.tokens.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(TEXTS[0] * 40)
    with open(root / "b.jsonl", "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"body": text, "id": 1}) + "\n")
    pq.write_table(pa.table({"body": TEXTS[::-1]}), root / "c.parquet")
    tok = train_bpe([TEXTS[0] * 40, TEXTS[1] * 10], 300, root / "tok")
    return root, tok


def test_prepare_decodes_back_and_reruns_incrementally(corpus, tmp_path):
    from gpu_workbench.parallel.tokens.prepare import prepare
    from gpu_workbench.parallel.tokens.shards import open_dataset

    root, tok = corpus
    srcs = [str(root / "*.txt"), str(root / "b.jsonl"), str(root / "c.parquet")]
    m = prepare(srcs, f"hf:{root / 'tok'}", tmp_path / "data", text_field="body", workers=2, progress=False)
    assert m["dtype"] == "uint16" and m["reused"] == 0 and m["documents"] == 1 + 4 + 4
    data = open_dataset(tmp_path / "data")
    assert data.n_tokens == m["tokens"]
    ends = [*data.doc_starts[1:], data.n_tokens]
    docs = [data.window(int(a), int(b - a)) for a, b in zip(data.doc_starts, ends, strict=True)]
    assert all(d[-1] == tok.eos_id for d in docs)                      # an EOS closes every document
    assert [tok.decode(list(d[:-1])) for d in docs] == [TEXTS[0] * 40, *TEXTS, *TEXTS[::-1]]
    assert data.doc_ids(int(data.doc_starts[3]) - 1, 3).tolist() == [2, 3, 3 if len(docs[3]) > 1 else 4]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "shards").iterdir()}
    again = prepare(srcs, f"hf:{root / 'tok'}", tmp_path / "data", text_field="body", workers=1, progress=False)
    assert again["reused"] == 3 and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "shards").iterdir()} \
        == before
    assert {k: v for k, v in again.items() if k != "reused"} == {k: v for k, v in m.items() if k != "reused"}


def test_long_documents_tokenize_in_pieces_with_the_same_tokens(corpus):
    from gpu_workbench.parallel.tokens.sources import pieces

    _, tok = corpus
    text = (TEXTS[0] + "  indented line\n\n\nnext\tpara " + TEXTS[1]) * 50
    cut = pieces(text, size=100)
    assert len(cut) > 10 and "".join(cut) == text
    assert np.concatenate(tok.encode(cut)).tolist() == tok.encode([text])[0].tolist()


def test_bytes_tokenizer_and_uint32_shards(tmp_path):
    from gpu_workbench.parallel.tokens.prepare import prepare
    from gpu_workbench.parallel.tokens.shards import dtype_for, open_dataset

    (tmp_path / "t.txt").write_text("héllo")
    m = prepare([str(tmp_path / "t.txt")], "bytes", tmp_path / "d", workers=1, progress=False)
    assert open_dataset(tmp_path / "d").window(0, m["tokens"]).tolist() == [*"héllo".encode(), 0]
    assert dtype_for(65536) == "uint16" and dtype_for(65537) == "uint32"


def test_bad_sources_one_line(corpus, tmp_path):
    root, _ = corpus
    (tmp_path / "bad.jsonl").write_text('{"body": "ok"}\n{"text": "no body"}\n')
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    tok = f"hf:{root / 'tok'}"
    one_line(wb("data", "prepare", str(tmp_path / "bad.jsonl"), "--tokenizer", tok, "--out", str(tmp_path / "o"),
                "--text-field", "body"), "bad.jsonl line 2 has no field 'body' (--text-field)")
    one_line(wb("data", "prepare", str(tmp_path / "*.txt"), "--tokenizer", tok, "--out", str(tmp_path / "o")),
             "no usable SRC file: all 2 skipped (1 empty, 1 not UTF-8)")
    one_line(wb("data", "prepare", str(root / "c.parquet"), "--tokenizer", tok, "--out", str(tmp_path / "o")),
             "has no column 'text' (--text-field)")
    one_line(wb("data", "prepare", str(root / "a.txt"), "--tokenizer", "hf:" + str(tmp_path), "--out",
                str(tmp_path / "o")), "no tokenizer.json in")
    done = wb("data", "prepare", str(root / "a.txt"), str(tmp_path / "empty.txt"), "--tokenizer", tok,
              "--out", str(tmp_path / "o"))
    assert done.returncode == 0 and "wb: skipped 1 of 2 SRC files (1 empty)" in done.stderr, done.stderr


def test_docstring_corpus_trains_a_tokenizer_and_prepares(tmp_path):
    """The demo's corpus, smaller: the interpreter's own docstrings (nothing downloaded), a BPE trained on
    them, prepared; the BPE compresses English text well below a token per byte."""
    from gpu_workbench.parallel.tokens.corpus import build
    from gpu_workbench.parallel.tokens.prepare import prepare
    from gpu_workbench.parallel.tokens.sources import documents
    from gpu_workbench.parallel.tokens.tokenizer import train_bpe

    n, size = build(tmp_path / "docs.jsonl", 0.3, ["stdlib"])
    assert size >= 0.3e6 and n > 100
    train_bpe(documents(tmp_path / "docs.jsonl", "text"), 1024, tmp_path / "tok")
    m = prepare([str(tmp_path / "docs.jsonl")], f"hf:{tmp_path / 'tok'}", tmp_path / "data", workers=2,
                progress=False)
    assert m["documents"] == n and m["tokens"] < 0.45 * size
