"""`wb hf inspect PATH`: a Hugging Face model directory read from its config.json and safetensors headers
alone: the architecture, its sizes, the weights, and the [model] section the project builds from it (or
the one line saying why it cannot)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from gpu_workbench.parallel.checkpoint.hf_dir import HFWeights
from gpu_workbench.parallel.checkpoint.hf_load import check_shapes
from gpu_workbench.parallel.models import hf_config


def _sizes(m) -> str:
    head_dim = m.head_dim or m.d_model // m.n_heads
    heads = f"{m.n_heads} heads ({m.n_kv_heads or m.n_heads} key/value, head_dim {head_dim})"
    rope = "" if m.arch == "gpt2" else f", rope theta {m.rope_theta:g}" + (
        f" llama3 x{m.rope_scaling_factor:g}" if m.rope_scaling_factor else "")
    return (f"{m.n_layers} layers, d_model {m.d_model}, {heads}, d_ff {m.d_ff}, vocab {m.vocab_size}, "
            f"{'tied' if m.tie_embeddings else 'untied'} head, context {m.max_positions}{rope}")


def _weights(w: HFWeights) -> str:
    from math import prod

    values, dtypes = 0, Counter()
    for name in w.files:
        n = prod(w.shape(name))
        values += n
        dtypes[w.dtype(name)] += n
    files = sorted(set(w.files.values()))
    where = files[0] if len(files) == 1 else f"{len(files)} shards ({files[0]} ...)"
    kinds = ", ".join(f"{k} {v / values:.0%}" for k, v in dtypes.most_common()) if values else "none"
    return f"{where}: {len(w.files)} tensors, {values / 1e6:.2f} M values ({kinds})"


def inspect(path: Path) -> list[str]:
    """The lines `wb hf inspect` prints; a UserError (one line) for what the project cannot build."""
    from gpu_workbench.parallel.config import RunConfig

    raw = hf_config.read_config(path, "PATH")
    arch, values = hf_config.model_values(path, "PATH")
    seq_len = min(values["max_positions"] or 2048, 2048)   # any length the context holds: the shapes ignore it
    cfg = RunConfig.from_toml(None, [f"checkpoint.load_from=hf:{path}", f"model.seq_len={seq_len}"])
    n_params = check_shapes(path, cfg.model)
    with HFWeights(path) as w:
        weights = _weights(w)
    section = " ".join(f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())
    hf_class = (raw.get("architectures") or ["?"])[0]
    return [f"{path}: {hf_class} (model_type {raw.get('model_type')}) -> model.arch={arch}",
            f"  sizes: {_sizes(cfg.model)}",
            f"  weights: {weights}",
            f"  builds: {n_params / 1e6:.2f} M parameters; every tensor present with the shape config.json implies",
            f"  [model] from config.json: {section}",
            f"  start a run from it: wb train checkpoint.load_from=hf:{path} [model.seq_len=N ...]"]
