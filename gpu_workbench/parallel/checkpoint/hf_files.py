"""The Hugging Face files a run keeps beside its checkpoints when it started from `hf:PATH`: the tokenizer
(tokenizer.json and its companions), generation_config.json and the source config.json, copied into
<run_dir>/hf/ at the start, so `wb sample` decodes with the tokenizer and `wb checkpoint export --format hf`
hands them back even after the source directory has gone."""

from __future__ import annotations

import shutil
from pathlib import Path

KEPT = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
        "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json")
SOURCE_CONFIG = "source_config.json"   # the source's config.json (its token ids), renamed


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "hf"


def keep(hf_dir: Path, run_dir: Path) -> None:
    """Copy the source's tokenizer and generation files into <run_dir>/hf/ (rank 0, at the start)."""
    out = folder(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (Path(hf_dir) / name).is_file():
            shutil.copyfile(Path(hf_dir) / name, out / name)
    if (Path(hf_dir) / "config.json").is_file():
        shutil.copyfile(Path(hf_dir) / "config.json", out / SOURCE_CONFIG)


def run_dir_of(step_folder: Path) -> Path:
    """<run_dir>/checkpoints/step_N -> <run_dir>."""
    return Path(step_folder).parent.parent


def tokenizer(run_dir: Path) -> Path | None:
    """The run's tokenizer.json, or None when it has none."""
    path = folder(run_dir) / "tokenizer.json"
    return path if path.is_file() else None
