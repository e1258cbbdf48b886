"""Text from a trained run: the newest checkpoint's weights, decoded token by token with a KV cache.

    model, cfg, source = load_model(run_dir)            # any recipe's checkpoint: the universal format
    ids = generate(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_k=20, seed=0)

The prompt runs through the model once, filling one LayerCache per block (parallel/models/transformer.py); each new
token then runs alone, its query attending to every cached key (the kernel's bottom-right causal mask).
Positions continue the cached ones, so gpt2's learned table and llama's rotary angles see the same
positions as a full forward pass of the whole sequence would: cached decoding equals recomputing.
temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) over the top_k logits (0 = all),
sampled with a generator seeded by `seed`, so a sample is reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpu_workbench.parallel.config import RunConfig
from gpu_workbench.parallel.models.transformer import GPT, LayerCache, build
from gpu_workbench.parallel.runtime.errors import UserError


def run_config(run_dir: Path) -> RunConfig:
    """The config a run was trained with (its config.json, without the segment history)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"RUN_DIR {run_dir} has no config.json: not a run directory (see `wb train`)")
    raw = {k: v for k, v in json.loads(path.read_text()).items() if k != "segments"}
    return RunConfig.from_dict(raw)


def load_model(run_dir: Path, device: str = "cpu", purpose: str = "sample from") -> tuple[GPT, RunConfig, str]:
    """The run's model with the weights of its newest good checkpoint (else final_model.pt), in eval mode;
    also its config and where the weights came from. `purpose` finishes the error line when there are none."""
    from gpu_workbench.parallel import checkpoint, recipes
    from gpu_workbench.parallel.checkpoint.universal import consolidated_weights

    cfg = run_config(run_dir)
    model = build(cfg.model)
    source = checkpoint.newest_good(Path(run_dir), recipes.get(cfg.recipe).checkpoint_globals())
    if source is not None:
        state = consolidated_weights(source, cfg.model.tie_embeddings)
    elif (Path(run_dir) / "final_model.pt").is_file():
        source = Path(run_dir) / "final_model.pt"
        state = torch.load(source, map_location="cpu", weights_only=True)
    else:
        raise UserError(f"RUN_DIR {run_dir} has no complete checkpoint and no final_model.pt to {purpose}")
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, str(source)


def _next_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, vocab) logits of the last position -> (B, 1) chosen token ids."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def check_length(seq_len: int, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len < 1:
        raise UserError("--prompt is empty: give at least one token")
    if max_new_tokens < 0 or prompt_len + max_new_tokens > seq_len:
        raise UserError(f"--max-new-tokens ({max_new_tokens}) must be >= 0 and, with the prompt's {prompt_len} "
                        f"tokens, fit the model's context, model.seq_len = {seq_len}")


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, use_cache: bool = True) -> torch.Tensor:
    """(B, T) prompt ids -> (B, T + max_new_tokens) ids. use_cache=False recomputes the whole sequence at
    every step (the reference the cache is tested against)."""
    check_length(model.cfg.seq_len, prompt.shape[1], max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    cache = [LayerCache() for _ in model.blocks] if use_cache else None
    ids, fresh = prompt, prompt   # fresh: the tokens the model has not seen yet
    for _ in range(max_new_tokens):
        if cache is None:
            logits = model(ids)
        else:
            positions = torch.arange(ids.shape[1] - fresh.shape[1], ids.shape[1], device=ids.device)
            logits = model(fresh, positions=positions, cache=cache)
        fresh = _next_token(logits[:, -1], temperature, top_k, generator)
        ids = torch.cat([ids, fresh], dim=1)
    return ids


def encode(cfg: RunConfig, prompt: str) -> list[int]:
    """Bytes data: the prompt's UTF-8 bytes; synthetic: its space-separated token ids."""
    if cfg.data.kind == "bytes":
        return list(prompt.encode("utf-8"))
    try:
        ids = [int(t) for t in prompt.split()]
    except ValueError:
        raise UserError(f"--prompt {prompt!r}: this run's data is synthetic, so a prompt is token ids separated "
                        f"by spaces (e.g. '3 17 5')") from None
    bad = [i for i in ids if not 0 <= i < cfg.model.vocab_size]
    if bad:
        raise UserError(f"--prompt holds token id {bad[0]}, outside the vocabulary 0..{cfg.model.vocab_size - 1}")
    return ids


def decode(cfg: RunConfig, ids: list[int]) -> str:
    if cfg.data.kind == "bytes":
        return bytes(ids).decode("utf-8", errors="replace")
    return " ".join(str(i) for i in ids)
