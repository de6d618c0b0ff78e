"""Text embeddings from a causal LM: the last layer at the last content token.

A text becomes `[bos] + tokenizer.encode(text)`, the same prefix a training sequence starts with, and is
truncated to `max_length` tokens (the first ones are kept). Pooling:
    last  hidden state at the last content token (default)
    eos   append eos and take its hidden state; eos never predicts anything in training, so this is
          offered only for comparison
    mean  mean hidden state over the text's tokens, bos excluded (a causal model's output at bos is the
          same for every text, so averaging it in only pulls all embeddings towards one point)
Texts are batched by length and right-padded; every architecture is causal, so padding never changes an
embedding, and results come back in input order.

`embed_corpus` writes an EMB_DIR:
    embeddings.safetensors  one tensor "embeddings" [N, D], float32 or float16
    ids.jsonl               {"id": str, "text": str} a line, in the same order
    meta.json               model path and hash, arch, dim, pooling, max_length, count, truncated, ...
It is built in a hidden sibling folder and put in place by io.publish_dir at the end, so an interrupted run
never leaves an EMB_DIR that looks complete. The corpus is read by mixret.data.read_corpus. Under torchrun
each process embeds a contiguous shard and rank 0 merges the shards; a failure on any rank stops every rank
with that rank's message.

Identity. Two embeddings can be compared only when the same weights computed them with the same pooling
from the same number of tokens: `EmbeddingSpec` (model hash, pooling, max_length) is recorded in meta.json,
in index.json and in a matcher's config.json, and `EmbeddingSpec.check` refuses a query encoder, an index
or a matcher whose spec differs from the corpus embeddings'.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mixret import io
from mixret.data import read_corpus
from mixret.distributed import Distributed
from mixret.errors import MixretError, where
from mixret.loop import autocast

POOLINGS = ("last", "eos", "mean")
EMB_NAME, IDS_NAME, META_NAME = "embeddings.safetensors", "ids.jsonl", "meta.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
_CHUNK = 16384  # texts tokenized, length-sorted and embedded at a time (bounds the memory for token lists)


# --- the encode API ---------------------------------------------------------------------------

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


# --- tokens -> embeddings ---------------------------------------------------------------------

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


# --- what makes embeddings comparable ----------------------------------------------------------

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


def resolve_spec(model_dir: str | os.PathLike, pooling: str | None = None, max_length: int | None = None,
                 match: Sequence[tuple[EmbeddingSpec, str]] = ()) -> EmbeddingSpec:
    """The spec to embed with, using the model in model_dir.

    pooling and max_length are what the user gave (None: not given). Each of `match` (a spec the embeddings
    must agree with, e.g. a matcher's, and its description), then the model's own defaults, must agree with
    what is settled so far (MixretError naming both values otherwise) and fills in what is not; the rest is
    last-token pooling over the model's whole context.
    """
    own = EmbeddingSpec.of_model(model_dir)
    spec = EmbeddingSpec(own.model_hash, pooling, max_length)
    for other, what in [*match, (own, f"the config.json of {model_dir}")]:
        other.check(spec, what, "the embeddings asked for")
        spec = EmbeddingSpec(spec.model_hash, spec.pooling or other.pooling, spec.max_length or other.max_length)
    context = io.read_json(Path(model_dir) / io.CONFIG_NAME, "model config").get("context")
    return EmbeddingSpec(spec.model_hash, spec.pooling or "last", spec.max_length or context)


# --- EMB_DIR ----------------------------------------------------------------------------------

def embed_corpus(
    model_dir: str | os.PathLike,
    corpus: str | os.PathLike,
    out_dir: str | os.PathLike,
    field: str = "text",
    id_field: str = "id",
    batch_size: int = 64,
    dtype: str = "float32",
    max_length: int | None = None,
    pooling: str | None = None,
    overwrite: bool = False,
    device: str | None = None,
    show_progress_bar: bool | None = None,
) -> dict:
    """Embed a corpus (see mixret.data.read_corpus) with the model in model_dir and write out_dir as an EMB_DIR.

    pooling and max_length default to the model's own (see resolve_spec; a value that differs from one the
    model's config.json sets is refused), else last-token pooling over the whole context.

    An existing out_dir is an error unless overwrite=True, and even then only an EMB_DIR is replaced,
    once the new one is complete. Empty texts are skipped and counted in meta.json; truncation is
    reported there and in a warning. Under torchrun (WORLD_SIZE > 1) each process embeds a contiguous
    shard on its own GPU (or the CPU, with gloo) and rank 0 merges; the output folder must be on a file
    system every process sees. Returns the meta dict.
    """
    from mixret.models import load

    if dtype not in DTYPES:
        raise MixretError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load(model_dir)
    spec = resolve_spec(model_dir, pooling, max_length)
    pooling, max_length = spec.pooling, check_options(model, batch_size, spec.max_length, spec.pooling)
    io.check_out_dir(out_dir, META_NAME, "embeddings", overwrite, what="embeddings")
    corpus_data = read_corpus(corpus, field, id_field)
    if corpus_data.skipped:
        warnings.warn(f"{corpus}: skipped {corpus_data.skipped} records with empty {field!r} text", stacklevel=2)

    with Distributed.from_env() as dist:
        device = pick_device(model, device if device is not None else dist.device)
        n = len(corpus_data.texts)
        lo, hi = n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size

        def make_temp() -> str:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            return str(io.temp_dir(out_dir.parent, out_dir.name, suffix=".partial"))

        tmp = Path(dist.broadcast_text(dist.on_main(make_temp) or ""))
        try:
            def embed_shard() -> tuple[torch.Tensor, int]:
                # rank 0 only; None: shown on a terminal
                disable = None if show_progress_bar is None else not show_progress_bar
                with tqdm(total=hi - lo, unit="text", desc="embed", disable=disable if dist.main else True) as bar:
                    return encode_texts(model, corpus_data.texts[lo:hi], batch_size, max_length, pooling, device,
                                        bar)

            E, truncated = dist.run(embed_shard)  # a failure on one rank fails every rank, with its message
            if dist.world_size > 1:
                E, truncated = gather_shards(dist, tmp, E, truncated)

            def publish() -> dict:
                meta = emb_meta(model_dir, model, corpus, field, id_field, pooling, max_length, dtype,
                                count=E.shape[0], truncated=truncated, skipped=corpus_data.skipped)
                write_emb_dir(tmp, E.to(DTYPES[dtype]), corpus_data.ids, corpus_data.texts, meta)
                io.publish_dir(tmp, out_dir)
                return meta

            meta = dist.on_main(publish)
        except BaseException:
            if dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if meta is not None and truncated:
        warnings.warn(f"{corpus}: " + truncation_message(truncated, meta["count"], max_length), stacklevel=2)
    return meta if meta is not None else {}


def emb_meta(model_dir: Path, model, corpus, field: str, id_field: str, pooling: str, max_length: int,
             dtype: str, count: int, truncated: int, skipped: int) -> dict:
    """meta.json of an EMB_DIR: where the embeddings came from and how they were made."""
    from mixret import __version__

    kept = f"[bos] + the first {max_length - 1} text tokens" if pooling != "eos" else \
        f"[bos] + the first {max_length - 2} text tokens + [eos]"
    return {
        "kind": "embeddings",
        "mixret_version": __version__,
        "model_path": str(model_dir.resolve()),
        "model_hash": io.file_hash(model_dir / io.WEIGHTS_NAME),
        "arch": model.config.arch,
        "dim": model.config.d_model,
        "pooling": pooling,
        "max_length": max_length,
        "truncation": f"longer texts keep {kept}",
        "count": count,
        "truncated": truncated,
        "skipped_empty": skipped,
        "dtype": dtype,
        "corpus": str(corpus),
        "field": field,
        "id_field": id_field,
    }


def default_model_dir(runs: str | os.PathLike = "runs") -> Path:
    """The most recently written language model folder under `runs` (a folder whose config.json is a clm)."""
    found = []
    for cfg in Path(runs).glob(f"*/{io.CONFIG_NAME}"):
        try:
            if json.loads(cfg.read_text(encoding="utf-8")).get("kind") == "clm":
                found.append((cfg.stat().st_mtime, cfg.parent))
        except (OSError, ValueError):
            continue
    if not found:
        raise MixretError(f"no model given and no model found in {Path(runs).resolve()}; pass --model DIR")
    return max(found)[1]


def default_out_dir(model_dir: str | os.PathLike, corpus: str | os.PathLike, field: str) -> Path:
    """emb/MODEL/CORPUS-FIELD, e.g. emb/small/pairs-document for data/pairs.jsonl.gz."""
    stem = Path(str(corpus).rstrip("/")).name.split(".")[0] or "corpus"
    return Path("emb") / Path(model_dir).resolve().name / f"{stem}-{field}"


def write_emb_dir(directory: Path, E: torch.Tensor, ids: list[str], texts: list[str], meta: dict) -> None:
    """Write embeddings, ids and (last) meta.json into directory."""
    from safetensors.torch import save_file

    with io.atomic_path(directory / EMB_NAME) as tmp:  # ordinary permissions (safetensors writes 0600)
        save_file({"embeddings": E.contiguous()}, tmp)
    with open(directory / IDS_NAME, "w", encoding="utf-8") as f:
        for i, t in zip(ids, texts):
            f.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    io.write_json(directory / META_NAME, meta)


def versioned(name: str, version: int) -> str:
    """The name of an EMB_DIR file in its version `version` (see mixret.corpus): "embeddings.safetensors" for 0
    (as `mixret embed` and `mixret index` write it), "embeddings.3.safetensors" for 3."""
    if not version:
        return name
    stem, _, rest = name.partition(".")
    return f"{stem}.{version}.{rest}"


def load_emb_dir(directory: str | os.PathLike) -> tuple[np.ndarray, list[str], list[str], dict]:
    """(embeddings [N, D] float32, ids, texts, meta) of an EMB_DIR written by embed_corpus, in the version its
    meta.json names (updates by `mixret index --add/--delete` write new versions; see mixret.corpus)."""
    from safetensors import safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise MixretError(f"{directory}: embeddings folder not found")
    meta = io.read_json(directory / META_NAME, "embeddings meta file (is this a complete EMB_DIR?)")
    version = meta.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise MixretError(f"{directory / META_NAME}: version {version!r}; expected a whole number >= 0")
    emb_path, ids_path = directory / versioned(EMB_NAME, version), directory / versioned(IDS_NAME, version)
    for p in (emb_path, ids_path):
        if not p.is_file():
            raise MixretError(f"{p}: not found; expected an EMB_DIR with {emb_path.name}, {ids_path.name} and "
                              f"{META_NAME}")
    try:
        with safe_open(str(emb_path), framework="np") as f:
            if "embeddings" not in f.keys():
                raise MixretError(f"{emb_path}: no tensor named 'embeddings' (found {', '.join(f.keys()) or 'none'})")
            E = f.get_tensor("embeddings")
    except MixretError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise MixretError(f"{emb_path}: cannot read safetensors file ({e})") from None
    if E.ndim != 2:
        raise MixretError(f"{emb_path}: 'embeddings' has shape {E.shape}; expected [N, D]")
    ids, texts = [], []
    with open(ids_path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                rec = json.loads(raw.decode("utf-8"))
                ids.append(str(rec["id"]))
                texts.append(rec["text"])
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
                raise MixretError(f"{where(ids_path, n)}: expected a JSON object with 'id' and 'text' "
                                  f"({type(e).__name__}: {e})") from None
    if len(ids) != E.shape[0] or meta.get("count", E.shape[0]) != E.shape[0]:
        raise MixretError(f"{directory}: {E.shape[0]} embeddings but {len(ids)} lines in {IDS_NAME} "
                          f"and count {meta.get('count')} in {META_NAME}; expected the same number")
    return E.astype(np.float32), ids, texts, meta


# --- torchrun ---------------------------------------------------------------------------------

def gather_shards(dist: Distributed, tmp: Path, E: torch.Tensor, truncated: int) -> tuple[torch.Tensor, int]:
    """Each rank writes tmp/shard-{rank}.safetensors; rank 0 returns them concatenated in rank order."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    dist.run(lambda: save_file({"embeddings": E.contiguous()}, str(tmp / f"shard-{dist.rank}.safetensors"),
                               metadata={"truncated": str(truncated)}))
    if not dist.main:
        return E, truncated
    parts, total = [], 0
    for r in range(dist.world_size):
        path = tmp / f"shard-{r}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            total += int(f.metadata()["truncated"])
        parts.append(load_file(str(path))["embeddings"])
        path.unlink()
    return torch.cat(parts), total
