"""A Hugging Face model directory's weights, read tensor by tensor and block by block (safetensors slices):
`model.safetensors`, or the shards a `model.safetensors.index.json` names. Nothing is read until asked,
so a rank reads only the blocks it holds (docs/ARCHITECTURE.md, Hugging Face in and out).

    with HFWeights(Path("hf/Llama-3.2-1B")) as w:
        w.shape("model.norm.weight"); w.slice("model.layers.0.mlp.up_proj.weight")[0:128, :]
"""

from __future__ import annotations

import json
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def weight_files(hf_dir: Path) -> dict[str, str]:
    """{tensor name: the file holding it} (one line naming a missing or unreadable file)."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    if (hf_dir / INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{hf_dir / INDEX} is unreadable ({type(e).__name__}: {e})") from None
        for shard in sorted(set(weight_map.values())):
            if not (hf_dir / shard).is_file():
                raise UserError(f"{hf_dir / INDEX} names the shard {shard}, which is missing from {hf_dir}")
        return dict(weight_map)
    if not (hf_dir / SINGLE).is_file():
        raise UserError(f"{hf_dir}: no {SINGLE} or {INDEX} (only safetensors weights are read; a "
                        f"pytorch_model.bin is not)")
    try:
        with safe_open(str(hf_dir / SINGLE), framework="pt") as f:
            return {name: SINGLE for name in f.keys()}
    except Exception as e:   # safetensors raises its own SafetensorError for a damaged header
        raise UserError(f"{hf_dir / SINGLE} is unreadable ({type(e).__name__}: {e})") from None


class HFWeights:
    """The directory's tensors by name, files opened on first use; a name saved without the base model's
    prefix (GPT-2's 'h.0.attn...' for 'transformer.h.0.attn...') is found too."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        self.files = weight_files(self.dir)
        self.handles: dict[str, object] = {}

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.handles.clear()   # safe_open handles close when dropped

    def name(self, name: str) -> str:
        if name in self.files:
            return name
        short = name.split(".", 1)[1] if "." in name else name
        if short in self.files:
            return short
        raise UserError(f"{self.dir}: tensor {name} is missing from its weights ({len(self.files)} tensors in "
                        f"{', '.join(sorted(set(self.files.values())))})")

    def slice(self, name: str):
        """A safetensors slice object: index it (`[a:b, :]`) to read only that block."""
        from safetensors import safe_open

        name = self.name(name)
        file = self.files[name]
        if file not in self.handles:
            try:
                self.handles[file] = safe_open(str(self.dir / file), framework="pt")
            except Exception as e:
                raise UserError(f"{self.dir / file} is unreadable ({type(e).__name__}: {e})") from None
        return self.handles[file].get_slice(name)

    def shape(self, name: str) -> list[int]:
        return list(self.slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self.slice(name).get_dtype()
