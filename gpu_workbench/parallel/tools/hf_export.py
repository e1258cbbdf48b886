"""`wb checkpoint export RUN_DIR --format hf --out DIR`: a run's newest good checkpoint (any layout) as a
Hugging Face model directory that transformers, vLLM or lm-eval load as-is: config.json and
generation_config.json, model.safetensors with {"format": "pt"} metadata, or shards
model-0000i-of-0000n.safetensors plus model.safetensors.index.json above --max-shard-size; Hugging Face's
names and layouts (the architecture's adapter, parallel/models/hf_adapter.py); the tokenizer files of a run
that started from a Hugging Face directory (hf_files.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from gpu_workbench.parallel import models
from gpu_workbench.parallel.checkpoint import hf_files
from gpu_workbench.parallel.checkpoint.manifest import read_meta
from gpu_workbench.parallel.config import ModelConfig, RunConfig
from gpu_workbench.parallel.models.hf_adapter import to_hf
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.tools.describe_checkpoint import export_weights, newest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (one line naming --max-shard-size otherwise)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not found or found.group(2).upper() not in UNITS or float(found.group(1)) <= 0:
        raise UserError(f"--max-shard-size={text!r}: give a size such as 5GB, 500MB or 2GiB")
    return int(float(found.group(1)) * UNITS[found.group(2).upper()])


def model_config(step_folder: Path) -> ModelConfig:
    """The checkpoint's [model] section, from the fingerprint its meta.json records."""
    meta, _ = read_meta(step_folder)
    cfg = RunConfig()
    for key, value in meta.get("fingerprint", {}).items():
        if key.startswith("model."):   # dotted keys, nested sections (model.moe.*) too
            try:
                cfg.set(key, value, from_text=False)
            except UserError:   # a key of another version of the project: not this one's
                continue
    return cfg.model


def shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in order, cut into groups of at most `limit` bytes (a bigger tensor alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    return groups


def write_weights(tensors: dict[str, torch.Tensor], out: Path, limit: int) -> list[str]:
    """model.safetensors, or shards and model.safetensors.index.json; the file names written."""
    from safetensors.torch import save_file

    groups = shards(tensors, limit)
    if len(groups) == 1:
        save_file(groups[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups, strict=True):
        save_file(group, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + ["model.safetensors.index.json"]


def _configs(m: ModelConfig, kept: Path | None, dtype: str) -> tuple[dict, dict]:
    """(config.json, generation_config.json): the adapter's mapping, the source's token ids kept."""
    config = models.get(m.arch).hf.to_config(m)
    source = kept / hf_files.SOURCE_CONFIG if kept is not None else None
    ids = json.loads(source.read_text()) if source is not None and source.is_file() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config[key] = ids.get(key)
    config["dtype"] = config["torch_dtype"] = "bfloat16" if dtype == "bf16" else "float32"
    generation = {"_from_model_config": True, **{k: config[k] for k in ("bos_token_id", "eos_token_id")}}
    return config, generation


def write_dir(m: ModelConfig, weights: dict[str, torch.Tensor], out: Path, dtype: str, limit: int,
              kept: Path | None = None) -> tuple[str, int, int]:
    """The Hugging Face directory of model `m` with the GPT's whole `weights` at `out` (written beside it,
    then renamed: never a half-written directory under the asked name); `kept`: a run's hf/ folder (its
    token ids and tokenizer). Returns (the Hugging Face class, tensors, weight files)."""
    tensors = {k: v.to(DTYPES[dtype]) for k, v in to_hf(models.get(m.arch).hf.names(m), weights).items()}
    config, generation = _configs(m, kept, dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = write_weights(tensors, tmp, limit)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    for name in hf_files.KEPT[:-1] if kept is not None and kept.is_dir() else ():   # generation_config: above
        if (kept / name).is_file():
            shutil.copyfile(kept / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return config["architectures"][0], len(tensors), len(written) - (len(written) > 1)


def export(path: Path, out: Path, dtype: str = "fp32", max_shard_size: str = "5GB", force: bool = False) -> str:
    """Write the Hugging Face directory `out`; returns the line that says what was written."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype}: choose bf16 or fp32")
    limit = parse_size(max_shard_size)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a directory for --format hf")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} exists and is not empty; pass --force to replace it, or name another directory")
    folder = newest(path)
    m = model_config(folder)
    if models.get(m.arch).hf is None:
        raise UserError(f"PATH {path}: model.arch={m.arch} has no Hugging Face adapter (see parallel/models/)")
    weights, info = export_weights(folder)
    kind, n_tensors, n_files = write_dir(m, weights, out, dtype, limit, hf_files.folder(hf_files.run_dir_of(folder)))
    return (f"{out}: {kind}, {n_tensors} tensors in {n_files} file(s), {dtype} (step {info['step']}, written by "
            f"{info['written_by']})")
