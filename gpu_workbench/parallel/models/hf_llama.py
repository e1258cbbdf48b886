"""The Hugging Face adapter of the llama family (llama, qwen2, qwen3; models/hf_adapter.py): LlamaForCausalLM's
names, the q/k rows permuted per head (halves <-> interleaved pairs), qwen2's q/k/v biases, qwen3's per-head
q/k RMSNorm (its weight permuted like a head: it scales each dimension before the rotation)."""

from __future__ import annotations

from gpu_workbench.parallel.models.hf_adapter import Adapter, Source, require, rope, rope_out


def _head_dim(m) -> int:
    return m.head_dim or m.d_model // m.n_heads


def _names(m, qkv_bias: bool, qk_norm: bool) -> dict[str, Source]:
    d = _head_dim(m)
    out = {"tok_emb.weight": Source("model.embed_tokens.weight"), "ln_f.weight": Source("model.norm.weight"),
           "head.weight": Source("model.embed_tokens.weight" if m.tie_embeddings else "lm_head.weight")}
    for i in range(m.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        a = h + "self_attn."
        out.update({b + "ln1.weight": Source(h + "input_layernorm.weight"),
                    b + "ln2.weight": Source(h + "post_attention_layernorm.weight"),
                    b + "attn.q.weight": Source(a + "q_proj.weight", "heads", head_dim=d),
                    b + "attn.k.weight": Source(a + "k_proj.weight", "heads", head_dim=d),
                    b + "attn.v.weight": Source(a + "v_proj.weight"),
                    b + "attn.proj.weight": Source(a + "o_proj.weight")})
        out.update({b + f"mlp.{p}.weight": Source(h + f"mlp.{p}_proj.weight") for p in ("gate", "up", "down")})
        if qkv_bias or m.qkv_bias:
            out.update({b + "attn.q.bias": Source(a + "q_proj.bias", "heads", head_dim=d),
                        b + "attn.k.bias": Source(a + "k_proj.bias", "heads", head_dim=d),
                        b + "attn.v.bias": Source(a + "v_proj.bias")})
        if qk_norm:
            out.update({b + f"attn.{x}_norm.weight": Source(a + f"{x}_norm.weight", "heads", head_dim=d)
                        for x in ("q", "k")})
    return out


def _from_config(hf: dict, arch: str) -> dict:
    require(hf, "hidden_act", ("silu", None), "the llama family's MLP is SwiGLU (silu)")
    require(hf, "mlp_bias", (False, None), "the llama family's MLP has no biases here")
    require(hf, "attention_bias", (False, None) if arch != "qwen2" else (False, True, None),
            "q/k/v biases are qwen2's (model_type qwen2)")
    require(hf, "use_sliding_window", (False, None), "sliding-window attention is not implemented")
    if arch == "llama":
        require(hf, "sliding_window", (None,), "sliding-window attention is not implemented")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    return {"arch": arch, "vocab_size": hf["vocab_size"], "d_model": hidden, "n_layers": hf["num_hidden_layers"],
            "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
            "d_ff": hf["intermediate_size"], "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "head_dim": head_dim if head_dim * heads != hidden else 0,
            "max_positions": hf.get("max_position_embeddings") or 0, **rope(hf)}


def _to_config(m, model_type: str, hf_class: str) -> dict:
    from gpu_workbench.parallel import models

    out = {"architectures": [hf_class], "model_type": model_type, "vocab_size": m.vocab_size,
           "hidden_size": m.d_model, "intermediate_size": models.get(m.arch).d_ff(m), "num_hidden_layers": m.n_layers,
           "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads,
           "head_dim": _head_dim(m), "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
           "max_position_embeddings": m.max_positions or m.seq_len, "tie_word_embeddings": m.tie_embeddings,
           "mlp_bias": False, "attention_dropout": 0.0, "use_cache": True, **rope_out(m)}
    if model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    else:
        out["attention_bias"] = False
    if model_type == "qwen3":
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def adapter(arch: str, hf_class: str, qkv_bias: bool = False, qk_norm: bool = False) -> Adapter:
    return Adapter(model_types=(arch,), hf_class=hf_class,
                   names=lambda m: _names(m, qkv_bias, qk_norm),
                   from_config=lambda hf: _from_config(hf, arch),
                   to_config=lambda m: _to_config(m, arch, hf_class))
