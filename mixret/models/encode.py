"""Texts -> embeddings: pooling (last real token, eos, mean), `encode` (sentence-transformers' signature) and the
`EmbeddingSpec` (model hash, pooling, max length) that every index, matcher and embeddings folder records."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mixret import io
from mixret.autocast import autocast
from mixret.errors import MixretError

POOLINGS = ("last", "eos", "mean")


DTYPES = {"float32": torch.float32, "float16": torch.float16}


_CHUNK = 16384  # texts tokenized, length-sorted and embedded at a time (bounds the memory for token lists)


def encode(
    model,
    texts: str | Sequence[str],
    batch_size: int = 64,
    normalize_embeddings: bool = False,
    convert_to_numpy: bool = True,
    max_length: int | None = None,
    pooling: str | None = None,
    show_progress_bar: bool | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray | torch.Tensor:
    """Embed texts with a causal LM (which needs `model.tokenizer`), sentence-transformers style.

    Returns [N, D] float32 in input order (a numpy array, or a CPU tensor when convert_to_numpy=False);
    a single string gives [D]. pooling and max_length default to the model's own (`model.embedding_defaults`,
    from its config.json), else last-token pooling over the model's context; longer texts keep their first
    tokens, with a warning giving the count. The model is moved to `device` (default: the GPU if there is
    one and the model is on the CPU) and left there. Empty texts raise MixretError naming their index.
    show_progress_bar=None shows a bar on a terminal when there is more than one batch.
    """
    single = isinstance(texts, str)
    texts = check_texts([texts] if single else texts)
    defaults = getattr(model, "embedding_defaults", {})
    pooling = pooling or defaults.get("pooling", "last")
    max_length = check_options(model, batch_size, max_length or defaults.get("max_length"), pooling)
    device = pick_device(model, device)
    disable = not show_progress_bar if show_progress_bar is not None else (None if len(texts) > batch_size else True)
    with tqdm(total=len(texts), unit="text", desc="embed", disable=disable) as bar:
        E, truncated = encode_texts(model, texts, batch_size, max_length, pooling, device, bar)
    if truncated:
        warnings.warn(truncation_message(truncated, len(texts), max_length), stacklevel=2)
    if normalize_embeddings:
        E = F.normalize(E, dim=-1)
    if single:
        E = E[0]
    return E.numpy() if convert_to_numpy else E


def check_texts(texts: Sequence[str]) -> list[str]:
    """texts as a list, or a MixretError naming the first one that is not a non-empty string."""
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise MixretError(f"text {i} is a {type(t).__name__}; expected a string")
        if not t.strip():
            raise MixretError(f"text {i} is empty; expected non-empty text (an empty text has nothing to embed)")
    return texts


def check_options(model, batch_size: int, max_length: int | None, pooling: str) -> int:
    """Validate the options shared by encode and embed_corpus; returns the effective max_length."""
    if getattr(model, "tokenizer", None) is None:
        raise MixretError("the model has no tokenizer: load it with mixret.load from a folder with "
                          f"{io.TOKENIZER_NAME}, or set model.tokenizer")
    if pooling not in POOLINGS:
        raise MixretError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    if batch_size < 1:
        raise MixretError(f"batch_size must be a positive integer, got {batch_size}")
    context = model.config.context
    max_length = context if max_length is None else max_length
    shortest = 3 if pooling == "eos" else 2  # bos + one content token (+ eos)
    if not shortest <= max_length <= context:
        raise MixretError(f"max_length must be between {shortest} and the model's context {context} "
                          f"for pooling {pooling!r}, got {max_length}")
    return max_length


def pick_device(model, device: str | torch.device | None) -> torch.device:
    """The requested device, else the model's, except that a CPU model goes to the GPU when there is one."""
    if device is None:
        device = next(model.parameters()).device
        if device.type == "cpu" and torch.cuda.is_available():
            device = torch.device("cuda")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MixretError(f"device {device} requested but no CUDA GPU is available; use --device cpu")
    model.to(device)
    return device


def truncation_message(truncated: int, total: int, max_length: int) -> str:
    return (f"{truncated} of {total} texts were longer than {max_length} tokens and were truncated "
            "(the start of each text was kept)")


def token_sequences(tokenizer, texts: list[str], max_length: int, pooling: str) -> tuple[list[list[int]], int]:
    """Model inputs `[bos] + ids` (+ `[eos]` for pooling "eos") of at most max_length tokens.

    Returns (sequences, number of texts that did not fit and lost their last tokens).
    """
    tail = [tokenizer.eos_id] if pooling == "eos" else []
    room = max_length - 1 - len(tail)  # content tokens that fit
    seqs, truncated = [], 0
    for ids in tokenizer.encode_batch(texts):
        truncated += len(ids) > room
        seqs.append([tokenizer.bos_id] + ids[:room] + tail)
    return seqs, truncated


def pool(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, L] right-padded ids and 0/1 mask -> [B, D] float32."""
    if pooling == "mean":  # positions 1.. only: bos (position 0) has the same hidden state in every text
        h = model.hidden(input_ids)[:, 1:].float()           # [B, L-1, D]
        m = attention_mask[:, 1:].unsqueeze(-1).to(h.dtype)  # [B, L-1, 1]; every text has a content token
        return (h * m).sum(dim=1) / m.sum(dim=1)
    # "last" and "eos": the last real token is the last content token, or the appended eos
    return model.embed(input_ids, attention_mask).float()


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences -> right-padded ids [B, L] and 0/1 attention mask [B, L] (L: the longest)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.as_tensor(s)
        mask[row, :len(s)] = 1
    return ids, mask


def embed_sequences(model, seqs: list[list[int]], batch_size: int, pooling: str, pad_id: int,
                    device: torch.device, bar=None) -> torch.Tensor:
    """[N] token sequences -> [N, D] float32 on the CPU, in input order.

    Sequences are sorted longest first, so each batch pads little and memory peaks on the first batch.
    """
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), model.config.d_model)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_sequences([seqs[i] for i in idx], pad_id)
        with autocast(device):
            out[idx] = pool(model, ids.to(device), mask.to(device), pooling).cpu()
        if bar is not None:
            bar.update(len(idx))
    return out


def encode_texts(model, texts: list[str], batch_size: int, max_length: int, pooling: str,
                 device: torch.device, bar=None) -> tuple[torch.Tensor, int]:
    """Checked texts -> ([N, D] float32 CPU tensor in input order, number of truncated texts).

    Runs in eval mode under inference_mode (bf16 autocast on CUDA) and restores the model's mode after.
    """
    tokenizer = model.tokenizer
    out = torch.empty(len(texts), model.config.d_model)
    truncated = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(texts), _CHUNK):
                seqs, t = token_sequences(tokenizer, texts[s:s + _CHUNK], max_length, pooling)
                out[s:s + len(seqs)] = embed_sequences(model, seqs, batch_size, pooling, tokenizer.pad_id,
                                                       device, bar)
                truncated += t
    finally:
        model.train(was_training)
    return out, truncated


@dataclass(frozen=True)
class EmbeddingSpec:
    """What makes two embeddings comparable: the weights that computed them (file hash of model.safetensors),
    the pooling and the most tokens a text keeps (bos included). None: not recorded (older files)."""
    model_hash: str | None
    pooling: str | None
    max_length: int | None

    @classmethod
    def of(cls, record: dict) -> "EmbeddingSpec":
        """The spec a meta.json, an index.json or a matcher's config.json records (a matcher names the model
        hash "embedder")."""
        return cls(record.get("model_hash", record.get("embedder")), record.get("pooling"), record.get("max_length"))

    @classmethod
    def of_model(cls, model_dir: str | os.PathLike) -> "EmbeddingSpec":
        """A model folder's own spec: its weights' hash, and the pooling and max_length its config.json sets as
        its defaults (None when it sets none)."""
        model_dir = Path(model_dir)
        cfg = io.read_json(model_dir / io.CONFIG_NAME, "model config")
        return cls(io.file_hash(model_dir / io.WEIGHTS_NAME), cfg.get("pooling"), cfg.get("max_length"))

    def to_dict(self) -> dict:
        return {"model_hash": self.model_hash, "pooling": self.pooling, "max_length": self.max_length}

    def check(self, other: "EmbeddingSpec", mine: str, theirs: str) -> None:
        """Refuse `other` (described as `theirs`) when it records a model hash, pooling or max_length that
        differs from this spec (described as `mine`); a value either side does not record is not compared."""
        diffs = [f"{'model' if key == 'model_hash' else key} {a!r} for {mine} but {b!r} for {theirs}"
                 for (key, a), b in zip(self.to_dict().items(), other.to_dict().values())
                 if a is not None and b is not None and a != b]
        if diffs:
            raise MixretError(f"{theirs} does not match {mine}: {'; '.join(diffs)}. Embeddings are comparable only "
                              "when the same model made them with the same pooling and max_length: use the "
                              "matching one, or re-embed")


def resolve_spec(model, pooling: str | None = None, max_length: int | None = None,
                 match: Sequence[tuple[EmbeddingSpec, str]] = ()) -> EmbeddingSpec:
    """The spec to embed with, using `model`: a loaded model (mixret.load; its folder is not read again) or the
    path of a model folder.

    pooling and max_length are what the user gave (None: not given). Each of `match` (a spec the embeddings
    must agree with, e.g. a matcher's, and its description), then the model's own defaults, must agree with
    what is settled so far (MixretError naming both values otherwise) and fills in what is not; the rest is
    last-token pooling over the model's whole context.
    """
    if isinstance(model, (str, os.PathLike)):
        own = EmbeddingSpec.of_model(model)
        context = io.read_json(Path(model) / io.CONFIG_NAME, "model config").get("context")
        where = f"the config.json of {model}"
    else:
        own, context, where = model.spec, model.config.context, f"the config.json of {model.source}"
    spec = EmbeddingSpec(own.model_hash, pooling, max_length)
    for other, what in [*match, (own, where)]:
        other.check(spec, what, "the embeddings asked for")
        spec = EmbeddingSpec(spec.model_hash, spec.pooling or other.pooling, spec.max_length or other.max_length)
    return EmbeddingSpec(spec.model_hash, spec.pooling or "last", spec.max_length or context)
