"""Tiny random Hugging Face models written with transformers' own save_pretrained (no download), one per
architecture of the registry, every parameter drawn at random (biases and norm weights too, so each
adapter rule is seen)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=64,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}


def config(arch: str, vocab_size: int = 97):
    import transformers as T


    tiny = {**TINY, "vocab_size": vocab_size}   # tensor parallelism needs an even one
    if arch == "llama":   # grouped-query, llama3 rope scaling, untied head
        return T.LlamaConfig(**tiny, num_attention_heads=6, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE,
                             tie_word_embeddings=False)
    if arch == "qwen2":   # q/k/v biases, tied head
        return T.Qwen2Config(**tiny, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen3":   # q/k norms, head_dim 10 (not 48 / 4)
        return T.Qwen3Config(**tiny, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                             tie_word_embeddings=False)
    return T.GPT2Config(vocab_size=vocab_size, n_embd=48, n_layer=2, n_head=6, n_positions=64, bos_token_id=None,
                        eos_token_id=None)


def save(arch: str, out: Path, seed: int = 0, dtype=torch.float32, vocab_size: int = 97) -> Path:
    """A random `arch` model saved into `out`; returns `out`."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config(arch, vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():   # norm weights about 1, everything else about 0
            norm = p.ndim == 1 and ("norm" in name or ".ln_" in name)
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if norm else 0.0))
    model.to(dtype).save_pretrained(out)
    return out


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


WORDS = ["[UNK]"] + [f"w{i}" for i in range(1, 94)] + ["the", "cat"]


def add_tokenizer(out: Path) -> Path:
    """A word-level tokenizer.json of the 96 WORDS (tokenizers' own format, as a Hugging Face directory holds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    tok.save(str(out / "tokenizer.json"))
    return out
