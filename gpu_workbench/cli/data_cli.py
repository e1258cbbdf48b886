"""`wb data prepare` and `wb data tokenizer train` (gpu_workbench/parallel/tokens/)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from gpu_workbench.cli.paths import output_file
from gpu_workbench.parallel.runtime.errors import UserError

app = typer.Typer(no_args_is_help=True, help="Prepare training data: tokenizers, token shards.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train a tokenizer.")
app.add_typer(tokenizer_app, name="tokenizer")


@app.command("prepare")
def prepare(
    sources: list[str] = typer.Argument(..., help="files or globs: .txt (one document per file), .jsonl "
                                        "(one per line), .parquet (one per row)"),
    out: Path = typer.Option(..., "--out", help="with --tokenizer: the dataset directory (data.path); "
                             "without: a byte-level token file for data.kind = 'bytes'"),
    tokenizer: str = typer.Option(None, "--tokenizer", help="bytes, or hf:DIR (a local tokenizer.json)"),
    text_field: str = typer.Option("text", "--text-field", help="JSON lines / Parquet: the text's field"),
    workers: int = typer.Option(0, "--workers", help="tokenizing processes (0: one per CPU)"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="progress bar (default: on a terminal)"),
    force: bool = typer.Option(False, "--force", help="without --tokenizer: replace --out if it exists"),
) -> None:
    """Tokenize sources into memory-mapped shards with a document index and a manifest (data.kind = "tokens");
    reruns tokenize only changed sources. Without --tokenizer: one file's raw bytes (data.kind = "bytes")."""
    if tokenizer is None:
        from gpu_workbench.parallel.data import prepare_bytes

        if len(sources) != 1:
            raise UserError("without --tokenizer, `wb data prepare` takes one TEXT_FILE (its bytes); name "
                            "--tokenizer bytes or hf:DIR to prepare several sources")
        out = output_file(out, "--out")   # a directory, a folder it cannot write: one line, nothing left behind
        if out.exists() and not force:
            raise UserError(f"--out {out} exists; pass --force to replace it, or name another file")
        n = prepare_bytes(sources[0], out)
        print(f"wrote {n} tokens to {out}")
        return
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    from gpu_workbench.parallel.tokens.prepare import prepare as run_prepare

    m = run_prepare(sources, tokenizer, out, text_field, workers, progress)
    print(f"wrote {m['tokens']} tokens ({m['dtype']}) in {m['documents']} documents from {len(m['sources'])} "
          f"sources ({m['reused']} unchanged, not tokenized again) to {out}")


@tokenizer_app.command("train")
def train_tokenizer(
    sources: list[str] = typer.Argument(..., help="files or globs (as for `wb data prepare`)"),
    vocab: int = typer.Option(..., "--vocab", help="vocabulary size (>= 257: the bytes, EOS, merges)"),
    out: Path = typer.Option(..., "--out", help="directory for tokenizer.json (use as --tokenizer hf:DIR)"),
    text_field: str = typer.Option("text", "--text-field", help="JSON lines / Parquet: the text's field"),
) -> None:
    """Train a byte-level BPE tokenizer with Hugging Face `tokenizers`; writes DIR/tokenizer.json."""
    from gpu_workbench.parallel.tokens import sources as src
    from gpu_workbench.parallel.tokens.tokenizer import train_bpe

    files = src.expand(sources)
    usable = [p for p in files if src.unusable(p) is None]
    if len(usable) < len(files):
        print(f"wb: skipped {len(files) - len(usable)} of {len(files)} SRC files (empty, binary or not UTF-8)",
              file=sys.stderr)
    if not usable:
        raise UserError(f"no usable SRC file: all {len(files)} are empty, binary or not UTF-8")
    tok = train_bpe((doc for p in usable for doc in src.documents(p, text_field)), vocab, out)
    print(f"trained a byte-level BPE of {tok.vocab_size} tokens on {len(usable)} files: {out}/tokenizer.json "
          f"(--tokenizer hf:{out})")
