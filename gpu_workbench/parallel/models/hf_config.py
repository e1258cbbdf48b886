"""A Hugging Face model directory's config.json, as the project's [model] section (docs/ARCHITECTURE.md,
Hugging Face in and out). Torch-free: RunConfig.validate fills the section from it.

    arch, values = model_values(Path("hf/Llama-3.2-1B"))       # {"d_model": 2048, "n_layers": 16, ...}
    apply(cfg)    # checkpoint.load_from = "hf:PATH": cfg.model from PATH's config.json; a model.* that disagrees
                  # with it is refused in one line
"""

from __future__ import annotations

import json
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError

PREFIX = "hf:"


def hf_path(load_from: str) -> Path | None:
    """The directory of checkpoint.load_from = "hf:PATH", or None for a project run."""
    return Path(load_from[len(PREFIX):]) if load_from.startswith(PREFIX) else None


def read_config(hf_dir: Path, what: str = "checkpoint.load_from") -> dict:
    """config.json of `hf_dir` (one line naming the file when it is missing, unreadable, or a project run's)."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise UserError(f"{what}: no such Hugging Face model directory: {hf_dir}")
    if (Path(hf_dir) / "checkpoints").is_dir() or (Path(hf_dir) / "meta.json").is_file():
        raise UserError(f"{what}: {hf_dir} is a gpu-workbench run or checkpoint, not a Hugging Face model "
                        f"directory; drop the 'hf:' prefix to start from it")
    if not path.is_file():
        raise UserError(f"{what}: {path} not found: a Hugging Face model directory holds config.json and "
                        f"model.safetensors")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what}: {path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict) or "segments" in raw or "model" in raw and isinstance(raw["model"], dict):
        raise UserError(f"{what}: {path} is a gpu-workbench run's config, not a Hugging Face config.json")
    return raw


def arch_of(hf: dict, path: Path):
    """The registry's ArchSpec whose adapter reads config.json's model_type."""
    from gpu_workbench.parallel import models

    kind = hf.get("model_type")
    for name in models.ARCHS:
        spec = models.get(name)
        if spec.hf is not None and kind in spec.hf.model_types:
            return spec
    known = [t for n in models.ARCHS if models.get(n).hf is not None for t in models.get(n).hf.model_types]
    raise UserError(f"{path}/config.json: model_type = {kind!r} is not in the model registry; supported: "
                    f"{', '.join(known)}")


def model_values(hf_dir: Path, what: str = "checkpoint.load_from") -> tuple[str, dict]:
    """(arch, {model key: value}) of the Hugging Face directory; a key the project lacks refused in one line."""
    hf = read_config(hf_dir, what)
    spec = arch_of(hf, Path(hf_dir))
    try:
        return spec.name, spec.hf.from_config(hf)
    except KeyError as e:
        raise UserError(f"{what}: {Path(hf_dir) / 'config.json'} lacks {e.args[0]!r}") from None
    except UserError as e:
        raise UserError(f"{what}: {hf_dir}/{e}") from None


def apply(cfg, explicit: set[str]) -> None:
    """Fill cfg.model from checkpoint.load_from's config.json. A model.* value set in the TOML or on the
    command line (`explicit`) or left different from the default, that disagrees, is refused in one line."""
    from dataclasses import fields

    hf_dir = hf_path(cfg.checkpoint.load_from)
    _, values = model_values(hf_dir)
    default = type(cfg.model)()
    for f in fields(cfg.model):
        if f.name not in values:
            continue
        have, want = getattr(cfg.model, f.name), values[f.name]
        chosen = f"model.{f.name}" in explicit or have != getattr(default, f.name)
        if chosen and have != want:
            raise UserError(f"model.{f.name}={have!r} disagrees with {hf_dir / 'config.json'} ({want!r}); the "
                            f"model comes from checkpoint.load_from=hf:{hf_dir}: drop model.{f.name}")
        setattr(cfg.model, f.name, want)
