"""Pretraining data: documents tokenized once (cached on disk) and served as sequences of token ids.

A corpus is tokenized into one flat token array with document offsets; a `Sequences` is a set of views into
such an array (one per document, truncated to the context, or packed full-context rows). The training order is
a `Stream`: an endless series of seeded permutations, so the batch of any step depends only on the seed.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mixret import io
from mixret.errors import MixretError
from mixret.tokenizer import load_tokenizer

CACHE_FORMAT = "mixret-tokens-v1"
BPE_SAMPLE_CHARS = 100_000_000  # BPE is trained on at most this many characters of the training split
UNIGRAM_SAMPLE_TOKENS = 20_000_000


@dataclass
class Sequences:
    """Training sequences as views into one token array: sequence i is tokens[starts[i]:ends[i]]."""
    tokens: np.ndarray  # [T] int32
    starts: np.ndarray  # [N] int64
    ends: np.ndarray    # [N] int64, 2 <= ends - starts <= context

    def __len__(self) -> int:
        return len(self.starts)

    def lengths(self, idx: np.ndarray) -> np.ndarray:
        return self.ends[idx] - self.starts[idx]

    @property
    def n_tokens(self) -> int:
        return int((self.ends - self.starts).sum())

    def batch(self, idx: np.ndarray, pad_id: int) -> "Batch":
        """Sequences idx, right-padded to the longest."""
        lengths = self.lengths(idx)
        B, L = len(idx), int(lengths.max())
        ids = np.full((B, L), pad_id, dtype=np.int64)
        for row, (start, n) in enumerate(zip(self.starts[idx], lengths)):
            ids[row, :n] = self.tokens[start:start + n]
        positions = np.flatnonzero(np.arange(L) < lengths[:, None] - 1)  # b * L + t for t < length_b - 1
        return Batch(input_ids=torch.from_numpy(ids),
                     attention_mask=torch.from_numpy((np.arange(L) < lengths[:, None]).astype(np.int64)),
                     positions=torch.from_numpy(positions),
                     targets=torch.from_numpy(ids.reshape(-1)[positions + 1]))

    def targets(self, max_tokens: int) -> np.ndarray:
        """The predicted tokens (all but each sequence's first), of the first sequences up to max_tokens."""
        parts, total = [], 0
        for s, e in zip(self.starts, self.ends):
            parts.append(self.tokens[s + 1:e])
            total += e - s - 1
            if total >= max_tokens:
                break
        return np.concatenate(parts)


@dataclass
class Batch:
    """A right-padded batch, with the positions whose next token is a real token (not padding)."""
    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor       # [N] flat indices b * L + t of the positions that predict a token
    targets: torch.Tensor         # [N] the token each of them predicts: input_ids[b, t + 1]

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        tensors = (self.input_ids, self.attention_mask, self.positions, self.targets)
        return Batch(*(t.pin_memory().to(device, non_blocking=True) for t in tensors))


def document_sequences(values: np.ndarray, offsets: np.ndarray, docs: np.ndarray, context: int) -> Sequences:
    """One sequence per document in `docs`, truncated to context."""
    starts = offsets[docs]
    return Sequences(values, starts, np.minimum(offsets[docs + 1], starts + context))


def packed_sequences(values: np.ndarray, offsets: np.ndarray, docs: np.ndarray, context: int) -> Sequences:
    """The documents in `docs`, concatenated in order and cut into rows of `context` tokens."""
    tokens = np.concatenate([values[offsets[d]:offsets[d + 1]] for d in docs])
    starts = np.arange(0, len(tokens), context, dtype=np.int64)
    ends = np.minimum(starts + context, len(tokens))
    keep = ends - starts >= 2
    return Sequences(tokens, starts[keep], ends[keep])


class Stream:
    """The endless training stream: epoch e visits every sequence once, in a permutation seeded by (seed, e).
    Position p of the stream is sequence perm_{p // n}[p % n]."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def take(self, position: int, count: int) -> np.ndarray:
        """Sequence indices at stream positions [position, position + count)."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, i = divmod(position + done, self.n)
            k = min(count - done, self.n - i)
            out[done:done + k] = self.perm(epoch)[i:i + k]
            done += k
        return out


def micro_batches(idx: np.ndarray, batch_size: int, grad_accum: int, world: int, rank: int) -> list[np.ndarray]:
    """This rank's micro-batches of one step's global batch idx [batch_size * grad_accum * world]: micro-step k
    of rank r takes the (k * world + r)-th slice of batch_size sequences."""
    return [idx[(k * world + rank) * batch_size:(k * world + rank + 1) * batch_size] for k in range(grad_accum)]


def split_documents(n: int, val_fraction: float, val_max_docs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices, each sorted; the validation set is drawn with the seed."""
    n_val = min(max(1, round(n * val_fraction)), val_max_docs)
    if n - n_val < 1:
        raise MixretError(f"the corpus has {n} document(s); need at least 2 (one to train on, one to validate)")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def corpus_fingerprint(texts) -> str:
    """blake2b of a pyarrow string column's lengths and bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    h = hashlib.blake2b(digest_size=16)
    for chunk in texts.chunks:
        chunk = chunk.cast(pa.large_string())
        h.update(pc.binary_length(chunk).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
        h.update(memoryview(chunk.buffers()[2])[int(offsets[0]):int(offsets[-1])])
    return h.hexdigest()


def tokenizer_text(tokenizer) -> str:
    """The tokenizer's tokenizer.json as text."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(Path(d) / io.TOKENIZER_NAME)
        return (Path(d) / io.TOKENIZER_NAME).read_text(encoding="utf-8")


def tokenizer_from_text(text: str):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / io.TOKENIZER_NAME).write_text(text, encoding="utf-8")
        return load_tokenizer(Path(d) / io.TOKENIZER_NAME)


def cache_root() -> Path:
    """Where mixret caches what it derives from data (tokens, teacher embeddings): $MIXRET_CACHE or ~/.cache/mixret."""
    return Path(os.environ.get("MIXRET_CACHE", "~/.cache/mixret")).expanduser()


def cache_dir() -> Path:
    return cache_root() / "tokens"


def encode_documents(texts: list[str], tokenizer) -> list[list[int]]:
    """[bos] + tokens + [eos] for each text."""
    return [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]


def tokenize_corpus(texts_ds, tokenizer, fingerprint: str, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every document of texts_ds (column "text") as [bos] + tokens + [eos]: (values [T] int32, offsets [N+1]).

    Runs datasets.map(batched=True) into an Arrow file in cache_dir() named by a hash of the corpus
    `fingerprint` and the tokenizer, so the same corpus and tokenizer are tokenized only once.
    """
    import datasets
    import pyarrow.compute as pc

    key = hashlib.blake2b(f"{CACHE_FORMAT}|{fingerprint}|{tokenizer_text(tokenizer)}".encode(),
                          digest_size=16).hexdigest()
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    tokens = texts_ds.map(
        lambda batch: {"ids": encode_documents(batch["text"], tokenizer)},
        batched=True, batch_size=1000, remove_columns=["text"], num_proc=num_workers or None,
        features=datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))}),
        cache_file_name=str(directory / f"{key}.arrow"), new_fingerprint=key, load_from_cache_file=True,
        desc="tokenizing",
    )
    column = tokens.data.column("ids")
    lengths = np.concatenate([pc.list_value_length(c).to_numpy() for c in column.chunks]).astype(np.int64)
    values = np.concatenate([c.flatten().to_numpy() for c in column.chunks])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return values, offsets


def unigram_loss(train: Sequences, val: Sequences, vocab_size: int) -> float:
    """Cross-entropy of the validation targets under add-one-smoothed unigram frequencies of the training
    targets: the loss a model that ignores context would reach."""
    counts = np.bincount(train.targets(UNIGRAM_SAMPLE_TOKENS), minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(-logp[val.targets(sys.maxsize)].mean())


def sample_texts(column, docs: np.ndarray, max_chars: int) -> Iterator[str]:
    """Texts of `docs` in order, until max_chars characters have been given."""
    import pyarrow as pa

    total = 0
    for lo in range(0, len(docs), 10_000):
        for text in column.take(pa.array(docs[lo:lo + 10_000])).to_pylist():
            yield text
            total += len(text)
            if total >= max_chars:
                return
