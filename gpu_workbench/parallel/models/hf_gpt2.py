"""GPT-2's Hugging Face adapter (models/hf_adapter.py): GPT2LMHeadModel's names; its Conv1D weights stored
(in, out), transposed; q, k, v as the thirds of the fused c_attn; learned positions (wpe); a tied head."""

from __future__ import annotations

from gpu_workbench.parallel.models.hf_adapter import Adapter, Source, refuse, require

GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": None, "gelu": "none"}


def _names(m) -> dict[str, Source]:
    t = "transformer."
    out = {"tok_emb.weight": Source(t + "wte.weight"), "pos_emb.weight": Source(t + "wpe.weight"),
           "ln_f.weight": Source(t + "ln_f.weight"), "ln_f.bias": Source(t + "ln_f.bias"),
           "head.weight": Source(t + "wte.weight" if m.tie_embeddings else "lm_head.weight")}
    for i in range(m.n_layers):
        b, h = f"blocks.{i}.", f"{t}h.{i}."
        for ln, hf_ln in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out.update({b + f"{ln}.{p}": Source(h + f"{hf_ln}.{p}") for p in ("weight", "bias")})
        for part, x in enumerate("qkv"):
            out[b + f"attn.{x}.weight"] = Source(h + "attn.c_attn.weight", "column", part)
            out[b + f"attn.{x}.bias"] = Source(h + "attn.c_attn.bias", "column", part)
        for ours, theirs in (("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[b + ours + ".weight"] = Source(h + theirs + ".weight", "transposed")
            out[b + ours + ".bias"] = Source(h + theirs + ".bias")
    return out


def _from_config(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if GELU.get(act) is None:
        raise refuse("activation_function", act, "gpt2's MLP here is gelu (exact) or gelu_new (tanh)")
    require(hf, "scale_attn_by_inverse_layer_idx", (False, None), "attention scores are scaled by head_dim only")
    require(hf, "scale_attn_weights", (True, None), "attention scores are always scaled by 1/sqrt(head_dim)")
    require(hf, "add_cross_attention", (False, None), "a decoder-only model has no cross-attention")
    return {"arch": "gpt2", "vocab_size": hf["vocab_size"], "d_model": hf["n_embd"], "n_layers": hf["n_layer"],
            "n_heads": hf["n_head"], "n_kv_heads": 0, "d_ff": hf.get("n_inner") or 4 * hf["n_embd"],
            "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)), "qkv_bias": True,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "gelu_approximate": GELU[act],
            "max_positions": hf.get("n_positions", 1024)}


def _to_config(m) -> dict:
    if not m.qkv_bias:
        raise refuse("model.qkv_bias", False, "GPT-2 in Hugging Face has q/k/v biases (c_attn.bias); a gpt2 run "
                     "exports only when started from a Hugging Face checkpoint or with model.qkv_bias=true")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
            "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.d_ff or 4 * m.d_model,
            "n_positions": m.max_positions or m.seq_len, "layer_norm_epsilon": m.norm_eps,
            "activation_function": "gelu_new" if m.gelu_approximate == "tanh" else "gelu",
            "tie_word_embeddings": m.tie_embeddings, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "scale_attn_weights": True, "use_cache": True}


ADAPTER = Adapter(model_types=("gpt2",), hf_class="GPT2LMHeadModel", names=_names, from_config=_from_config,
                  to_config=_to_config)
