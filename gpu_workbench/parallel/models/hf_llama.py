"""The Hugging Face adapter of the llama family (llama, qwen2, qwen3, qwen3_moe, mixtral; models/hf_adapter.py):
LlamaForCausalLM's names, the q/k rows permuted per head (halves <-> interleaved pairs), qwen2's q/k/v biases,
qwen3's per-head q/k RMSNorm (its weight permuted like a head: it scales each dimension before the rotation), and
the routed blocks of Qwen3-MoE and Mixtral (the router, each expert's Linears stacked into the MoE layer's
(experts, in, out) weights)."""

from __future__ import annotations

from gpu_workbench.parallel.models.hf_adapter import Adapter, Source, require, rope, rope_out


def _head_dim(m) -> int:
    return m.head_dim or m.d_model // m.n_heads


# A routed block's names, per format: (its MLP's prefix, each expert's Linear for our gate, up and down)
MOE_FORMATS = {"qwen3_moe": ("mlp.", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
               "mixtral": ("block_sparse_moe.", {"gate": "w1", "up": "w3", "down": "w2"})}


def _names(m, qkv_bias: bool, qk_norm: bool, arch: str) -> dict[str, Source]:
    from gpu_workbench.parallel.models.moe import is_moe_block  # torch: not at import (config checks)

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
        out.update(_moe_names(m, b, h, arch) if is_moe_block(m, i) else
                   {b + f"mlp.{p}.weight": Source(h + f"mlp.{p}_proj.weight") for p in ("gate", "up", "down")})
        if qkv_bias or m.qkv_bias:
            out.update({b + "attn.q.bias": Source(a + "q_proj.bias", "heads", head_dim=d),
                        b + "attn.k.bias": Source(a + "k_proj.bias", "heads", head_dim=d),
                        b + "attn.v.bias": Source(a + "v_proj.bias")})
        if qk_norm:
            out.update({b + f"attn.{x}_norm.weight": Source(a + f"{x}_norm.weight", "heads", head_dim=d)
                        for x in ("q", "k")})
    return out


def _moe_names(m, b: str, h: str, arch: str) -> dict[str, Source]:
    """A routed block's MLP: the router (<prefix>gate) and each expert's three Linears, stacked here."""
    prefix, linears = MOE_FORMATS[arch]
    x = m.moe.experts
    return {b + "mlp.router.weight": Source(h + prefix + "gate.weight"),
            **{b + f"mlp.experts.{ours}": Source(h + prefix + "experts.{e}." + f"{theirs}.weight", "experts", part=x)
               for ours, theirs in linears.items()}}


def _moe_from_config(hf: dict, arch: str) -> dict:
    """model.moe from config.json: Qwen3-MoE routes every decoder_sparse_step-th layer (its top-k weights
    normalised if norm_topk_prob), Mixtral every layer (always normalised); both softmax top-k."""
    from gpu_workbench.parallel.config import MoeConfig

    require(hf, "mlp_only_layers", ([], None), "every decoder_sparse_step-th layer is routed here, no exceptions")
    require(hf, "router_jitter_noise", (0, 0.0, None), "router jitter noise is not implemented")
    experts = hf["num_local_experts"] if "num_local_experts" in hf else hf["num_experts"]   # transformers 5, 4
    mixtral = arch == "mixtral"
    return {"moe": MoeConfig(experts=experts, top_k=hf["num_experts_per_tok"],
                             every=1 if mixtral else hf.get("decoder_sparse_step") or 1,
                             d_ff=hf["intermediate_size" if mixtral else "moe_intermediate_size"],
                             norm_topk=mixtral or bool(hf.get("norm_topk_prob", False)),
                             aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))}


def _moe_to_config(m, arch: str) -> dict:
    from gpu_workbench.parallel.models.moe import expert_width

    e = m.moe
    mixtral = arch == "mixtral"
    if e.score != "softmax" or e.shared_experts or e.capacity_factor or (mixtral and (e.every != 1 or not e.norm_topk)):
        from gpu_workbench.parallel.runtime.errors import UserError

        held = "every layer routed, top-k weights normalised, " if mixtral else ""
        raise UserError(f"{arch}'s format holds {held}softmax routing without shared experts or a capacity factor; "
                        f"this model has model.moe.score={e.score}, shared_experts={e.shared_experts}, "
                        f"capacity_factor={e.capacity_factor}, every={e.every}, norm_topk={e.norm_topk}")
    out = {"num_local_experts": e.experts, "num_experts_per_tok": e.top_k, "router_aux_loss_coef": e.aux_loss_coef,
           "output_router_logits": False}
    if mixtral:
        return {**out, "intermediate_size": expert_width(m), "router_jitter_noise": 0.0}
    return {**out, "num_experts": e.experts, "decoder_sparse_step": e.every, "moe_intermediate_size": expert_width(m),
            "norm_topk_prob": e.norm_topk, "mlp_only_layers": []}


def _from_config(hf: dict, arch: str) -> dict:
    require(hf, "hidden_act", ("silu", None), "the llama family's MLP is SwiGLU (silu)")
    require(hf, "mlp_bias", (False, None), "the llama family's MLP has no biases here")
    require(hf, "attention_bias", (False, None) if arch != "qwen2" else (False, True, None),
            "q/k/v biases are qwen2's (model_type qwen2)")
    require(hf, "use_sliding_window", (False, None), "sliding-window attention is not implemented")
    if arch in ("llama", "mixtral"):
        require(hf, "sliding_window", (None,), "sliding-window attention is not implemented")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    return {"arch": arch, "vocab_size": hf["vocab_size"], "d_model": hidden, "n_layers": hf["num_hidden_layers"],
            "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
            "d_ff": hf["intermediate_size"], "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "head_dim": head_dim if head_dim * heads != hidden else 0,
            "max_positions": hf.get("max_position_embeddings") or 0, **rope(hf),
            **(_moe_from_config(hf, arch) if arch in MOE_FORMATS else {})}


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
    if model_type in ("qwen3", "qwen3_moe"):
        out.update(use_sliding_window=False, sliding_window=None)
    if model_type == "mixtral":
        out.update(sliding_window=None)
    if model_type in MOE_FORMATS:
        out.update(_moe_to_config(m, model_type))
    return out


def adapter(arch: str, hf_class: str, qkv_bias: bool = False, qk_norm: bool = False) -> Adapter:
    return Adapter(model_types=(arch,), hf_class=hf_class,
                   names=lambda m: _names(m, qkv_bias, qk_norm, arch),
                   from_config=lambda hf: _from_config(hf, arch),
                   to_config=lambda m: _to_config(m, arch, hf_class))
