"""Tokenizers: `bytes` (each UTF-8 byte a token, vocabulary 256, EOS = byte 0) or `hf:DIR`, a Hugging Face
`tokenizers` tokenizer.json in a local directory (never a hub download). `train_bpe` makes one: a
byte-level BPE (GPT-2's pre-tokenizer, every byte in the initial alphabet, so no text is out of vocabulary)
with `<|endoftext|>` as its EOS, the token written between documents."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gpu_workbench.parallel.runtime.errors import UserError

EOS_TEXT = "<|endoftext|>"
_EOS_NAMES = (EOS_TEXT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class Tokenizer:
    """`encode(texts)` -> one int array per text (no special tokens added); `eos_id`, `vocab_size`,
    `hash` (sha256 of tokenizer.json, or "bytes"), `spec` (what the user named)."""

    def __init__(self, spec: str):
        self.spec = spec
        if spec == "bytes":
            self.vocab_size, self.eos_id, self.hash, self._hf = 256, 0, "bytes", None
            return
        if not spec.startswith("hf:"):
            raise UserError(f"--tokenizer must be 'bytes' or 'hf:DIR' (a directory holding tokenizer.json), "
                            f"got '{spec}'")
        path = Path(spec[3:]) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"--tokenizer {spec}: no tokenizer.json in {spec[3:]} (train one with "
                            f"`wb data tokenizer train`)")
        from tokenizers import Tokenizer as HfTokenizer

        raw = path.read_bytes()
        try:
            self._hf = HfTokenizer.from_str(raw.decode())
        except Exception as error:   # the library's own parse error, in one line
            raise UserError(f"--tokenizer {spec}: {path} is not a tokenizers JSON file ({error})") from None
        self.vocab_size, self.hash = self._hf.get_vocab_size(with_added_tokens=True), hashlib.sha256(raw).hexdigest()
        self.eos_id = _eos_id(self._hf, Path(spec[3:]), spec)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if self._hf is None:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which nothing here reads
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        if self._hf is None:
            return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")
        return self._hf.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict:
        return {"spec": self.spec, "hash": self.hash, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def _eos_id(hf, folder: Path, spec: str) -> int:
    """tokenizer_config.json's eos_token when there is one, else the first known end-of-text token."""
    names = list(_EOS_NAMES)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos:
            names.insert(0, eos)
    for name in names:
        token = hf.token_to_id(name)
        if token is not None:
            return int(token)
    raise UserError(f"--tokenizer {spec}: no end-of-text token (looked for {', '.join(names)}); the token "
                    f"between documents needs one")


def train_bpe(texts: Iterable[str], vocab: int, out: Path) -> Tokenizer:
    """Train a byte-level BPE of `vocab` tokens (the 256 bytes, EOS and merges) on `texts`; save
    out/tokenizer.json and return it loaded."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab < 257:
        raise UserError(f"--vocab must be >= 257 (the 256 bytes and {EOS_TEXT}), got {vocab}")
    tok = HfTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TEXT}) + "\n")
    return Tokenizer(f"hf:{out}")
