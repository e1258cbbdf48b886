"""The Hugging Face state-dict adapter every architecture's file fills in (docs/ARCHITECTURE.md, Hugging Face in
and out): which Hugging Face tensor each of the GPT's parameters is, and how its layout differs, in both
directions; and the mapping between a `config.json` and the `[model]` section.

A parameter comes from its Hugging Face tensor in one of four ways (Source.kind):

    same        the same layout (norms, embeddings, the MLP's Linears)
    heads       q or k rows (weight or bias): the project rotates interleaved pairs (2i, 2i+1) of each head,
                Meta's convention, Hugging Face rotates halves (i, i + D/2); the rows are permuted per head
    transposed  GPT-2's Conv1D weights are stored (in, out), the transpose of nn.Linear's
    column      one third of GPT-2's fused c_attn (Conv1D (C, 3C), bias (3C,)): q, k or v
    experts     a MoE layer's stacked expert weight (X, in, out) from X per-expert nn.Linear weights (out, in),
                `hf` a name with "{e}" for the expert's index (Qwen3-MoE's mlp.experts.{e}.gate_proj.weight)

A reader asks for a block of the parameter (its rank's shard: a tuple of slices) and gets only that block
from the file (`read`: safetensors slices; a permuted q/k reads the whole heads its rows fall in). Torch is
imported only inside the functions: config checks read the registry without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpu_workbench.parallel.runtime.errors import UserError


@dataclass(frozen=True)
class Source:
    hf: str                     # the Hugging Face tensor's name
    kind: str = "same"          # same | heads | transposed | column | experts
    part: int = 0               # column: which third of c_attn (q 0, k 1, v 2); experts: how many experts
    head_dim: int = 0           # heads: each head's width


@dataclass(frozen=True)
class Adapter:
    """One architecture's mapping. `names(m)` lists {GPT parameter name: Source} for ModelConfig m;
    `from_config(hf_config)` gives the [model] values ({key: value}) or raises a UserError naming the key;
    `to_config(m)` writes the config.json of model m."""
    model_types: tuple[str, ...]             # config.json's model_type values this architecture reads
    hf_class: str                            # config.json's architectures[0] on export
    names: Callable[[Any], dict[str, Source]]
    from_config: Callable[[dict], dict]
    to_config: Callable[[Any], dict]
    generation: Callable[[dict], dict] = field(default=lambda hf: {})


# ---- the q/k permutation -------------------------------------------------------------------------
def pair_order(head_dim: int) -> list[int]:
    """Row p of a project head is row order[p] of the Hugging Face head: pair i's two components (2i, 2i+1)
    are Hugging Face's rows i and i + D/2."""
    half = head_dim // 2
    return [(p % 2) * half + p // 2 for p in range(head_dim)]


def to_interleaved(t, head_dim: int):
    """Hugging Face rows (whole heads) -> the project's, per head (a weight's rows or a bias)."""
    import torch

    order = torch.tensor(pair_order(head_dim))
    heads = t.reshape(-1, head_dim, *t.shape[1:])
    return heads[:, order].reshape(t.shape)


def to_halves(t, head_dim: int):
    """The project's q/k rows -> Hugging Face's (the inverse of to_interleaved)."""
    import torch

    inverse = torch.argsort(torch.tensor(pair_order(head_dim)))
    heads = t.reshape(-1, head_dim, *t.shape[1:])
    return heads[:, inverse].reshape(t.shape)


PERMUTE = {"in": to_interleaved, "out": to_halves}   # a test swaps these for identities (negative control)


# ---- reading a block of a parameter ----------------------------------------------------------
def read(src: Source, open_slice: Callable[[str], Any], index: tuple[slice, ...]):
    """The block `index` (one slice per dimension, in the project's layout) of the parameter `src` names,
    read from the Hugging Face file through `open_slice(name)` (a safetensors slice object)."""
    f = open_slice(src.hf) if src.kind != "experts" else None
    if src.kind == "same":
        return f[index]
    if src.kind == "transposed":
        return f[index[::-1]].T
    if src.kind == "experts":   # (X, in, out) block from each expert's (out, in) weight
        import torch

        experts, rows, cols = index
        return torch.stack([open_slice(src.hf.format(e=e))[cols, rows].T for e in range(experts.start, experts.stop)])
    if src.kind == "column":
        rows = index[0]
        width = f.get_shape()[-1] // 3
        cols = slice(src.part * width + rows.start, src.part * width + rows.stop)
        return f[cols] if len(index) == 1 else f[index[1], cols].T
    rows, d = index[0], src.head_dim                  # heads: whole heads read, permuted, then cut
    first, last = rows.start // d * d, -(-rows.stop // d) * d
    whole = PERMUTE["in"](f[(slice(first, last),) + index[1:]], d)
    return whole[rows.start - first:rows.stop - first]


# ---- writing the Hugging Face state dict (export) ----------------------------------------------
def to_hf(sources: dict[str, Source], weights: dict) -> dict:
    """{Hugging Face name: tensor} from the GPT's whole weights; c_attn's thirds joined again."""
    import torch

    out, fused = {}, {}
    for name, src in sources.items():
        t = weights[name]
        if src.kind == "heads":
            out[src.hf] = PERMUTE["out"](t, src.head_dim)
        elif src.kind == "transposed":
            out[src.hf] = t.T
        elif src.kind == "experts":
            out.update({src.hf.format(e=e): t[e].T for e in range(t.shape[0])})
        elif src.kind == "column":
            fused.setdefault(src.hf, {})[src.part] = t.T if t.ndim == 2 else t
        else:
            out.setdefault(src.hf, t)   # a tied head names the embedding again: written once
    for hf, parts in fused.items():
        out[hf] = torch.cat([parts[i] for i in range(3)], dim=-1)
    return {k: v.contiguous() for k, v in out.items()}


# ---- config.json ---------------------------------------------------------------------------------
def refuse(key: str, value: Any, why: str) -> UserError:
    return UserError(f"config.json: {key} = {value!r} is not supported: {why}")


def rope(hf: dict) -> dict:
    """rope_theta and Llama 3.1's scaling from `rope_parameters` (transformers 5) or `rope_scaling` and
    `rope_theta` (4.x); any other rope type is refused."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    out = {"rope_theta": float(theta)}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse("partial_rotary_factor", params["partial_rotary_factor"], "every dimension is rotated here")
    if kind == "default":
        return out
    if kind != "llama3":
        raise refuse("rope_scaling.rope_type", kind, "only 'llama3' scaling (or none) is implemented")
    return {**out, "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_positions": int(params["original_max_position_embeddings"])}


def rope_out(m) -> dict:
    """config.json's rope keys (both spellings, so transformers 4.x and 5.x read it)."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling_factor:
        params.update(rope_type="llama3", factor=m.rope_scaling_factor, low_freq_factor=m.rope_low_freq_factor,
                      high_freq_factor=m.rope_high_freq_factor,
                      original_max_position_embeddings=m.rope_original_max_positions)
    scaling = {**params, "type": params["rope_type"]} if m.rope_scaling_factor else None
    return {"rope_theta": m.rope_theta, "rope_parameters": params, "rope_scaling": scaling}


def require(hf: dict, key: str, allowed: tuple, why: str) -> None:
    """Refuse config.json's `key` unless its value (absent: None) is one of `allowed`."""
    value = hf.get(key)
    if value not in allowed:
        raise refuse(key, value, why)
