"""Tokenizers: a byte-level tokenizer (exact round trip) and BPE trained with the `tokenizers` library.

Both save to a `tokenizer.json`; `load_tokenizer(path)` reads either kind back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mixret.errors import MixretError
from mixret.io import atomic_write_text

PAD, BOS, EOS = "<pad>", "<bos>", "<|endoftext|>"
PREFIX = " "    # put before every text by BPE tokenizers, so a word is the same tokens wherever it stands


class ByteTokenizer:
    """256 byte ids, then pad=256, bos=257, eos=258 (never colliding with a byte value)."""

    kind = "bytes"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps({"mixret_tokenizer": "bytes", "vocab_size": self.vocab_size}) + "\n")


class BPETokenizer:
    """Byte-level BPE (no unknown tokens) from the `tokenizers` library, with pad/bos/eos special tokens."""

    kind = "bpe"

    def __init__(self, tok):
        from tokenizers import Tokenizer
        self.tok: Tokenizer = tok
        self.pad_id = tok.token_to_id(PAD)
        self.bos_id = tok.token_to_id(BOS)
        self.eos_id = tok.token_to_id(EOS)
        if None in (self.pad_id, self.bos_id, self.eos_id):
            raise MixretError(f"BPE tokenizer lacks one of the special tokens {PAD}, {BOS}, {EOS}")
        self.vocab_size = tok.get_vocab_size()
        norm = json.loads(tok.to_str()).get("normalizer") or {}
        self.prefix = any(n.get("type") == "Prepend" and n.get("prepend") == PREFIX  # what decode takes off again
                          for n in norm.get("normalizers", [norm]))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, lowercase: bool = False,
              batch_size: int = 1000) -> "BPETokenizer":
        """BPE learnt from `texts`. Every text gets a leading space, so a word is the same tokens at the start of a
        text as inside it; `lowercase` also folds case (after NFKC), so "Print" and "print" are one token."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        steps = [normalizers.NFKC(), normalizers.Lowercase()] if lowercase else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Prepend(PREFIX)])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(_batches(texts, batch_size), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        text = self.tok.decode(list(ids), skip_special_tokens=True)
        return text[len(PREFIX):] if self.prefix and text.startswith(PREFIX) else text    # the one encode added

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.tok.to_str())


def _batches(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


BPE_KINDS = {"bpe": False, "bpe-lower": True}    # a BPE tokenizer to train -> whether it folds case


def make_tokenizer(spec: str, vocab_size: int, texts: Callable[[], Iterable[str]],
                   say: Callable[[str], None] = print, where: str = "the training texts"):
    """The tokenizer a run asks for: "bpe" or "bpe-lower" (trained on texts(), lowercased for bpe-lower),
    "bytes", or the path of a tokenizer.json."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec not in BPE_KINDS:
        return load_tokenizer(spec)
    lowercase = BPE_KINDS[spec]
    say(f"training a BPE tokenizer ({vocab_size:,} tokens{', lowercased' if lowercase else ''}) on {where}")
    return BPETokenizer.train(texts(), vocab_size=vocab_size, lowercase=lowercase)


def load_tokenizer(path: str | os.PathLike) -> ByteTokenizer | BPETokenizer:
    """Read a tokenizer.json written by either tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise MixretError(f"{path}: tokenizer file not found")
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise MixretError(f"{path}: not valid JSON ({e})") from None
    if obj.get("mixret_tokenizer") == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer
    try:
        return BPETokenizer(Tokenizer.from_str(text))
    except Exception as e:
        raise MixretError(f"{path}: not a tokenizer file mixret can read ({e})") from None
