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

import numpy as np
import torch
from tqdm.auto import tqdm

from mixret import io
from mixret.data import read_corpus
from mixret.distributed import Distributed
from mixret.errors import MixretError, where
from mixret.io import versioned
from mixret.models.encode import (
    DTYPES,
    POOLINGS,
    EmbeddingSpec,
    check_options,
    encode_texts,
    pick_device,
    resolve_spec,
    truncation_message,
)
from mixret.models.matcher import Matcher
from mixret.models.zoo import load
from mixret.options import option
from mixret.version import __version__

EMB_NAME, IDS_NAME, META_NAME = "embeddings.safetensors", "ids.jsonl", "meta.json"


# --- the encode API ---------------------------------------------------------------------------











# --- tokens -> embeddings ---------------------------------------------------------------------











# --- what makes embeddings comparable ----------------------------------------------------------





# --- EMB_DIR ----------------------------------------------------------------------------------

@dataclass
class EmbedConfig:
    """How `mixret embed` (and embed_corpus) embeds a corpus."""
    field: str = option("text", "JSONL field / column with the texts (a pairs file such as the bundled one has "
                                "summary and document, no text); for a TinyStoriesInstruct .txt: summary or document.")
    id_field: str = option("id", "Field with the ids (line or row numbers when a record has none).")
    batch_size: int = option(64, "Texts per forward pass.")
    dtype: str = option("float32", "Stored embedding type.", choices=tuple(DTYPES))
    max_length: int | None = option(None, "Tokens per text, bos included.", show="the model's own, else its context")
    pooling: str | None = option(None, "last content token, an appended eos (for comparison), or mean over the "
                                       "content tokens.", choices=POOLINGS, show="the model's own, else last")
    device: str | None = option(None, "torch device.", show="the GPU if there is one")
    overwrite: bool = option(False, "Replace an existing EMB_DIR once the new one is complete.", switch="--overwrite")
    show_progress_bar: bool | None = option(None, "A progress bar (None: on a terminal).", cli=False)


def embed_corpus(model_dir: str | os.PathLike, corpus: str | os.PathLike, out_dir: str | os.PathLike,
                 **options) -> dict:
    """Embed a corpus (see mixret.data.read_corpus) with the model in model_dir and write out_dir as an EMB_DIR.

    pooling and max_length default to the model's own (see resolve_spec; a value that differs from one the
    model's config.json sets is refused), else last-token pooling over the whole context.

    An existing out_dir is an error unless overwrite=True, and even then only an EMB_DIR is replaced,
    once the new one is complete. Empty texts are skipped and counted in meta.json; truncation is
    reported there and in a warning. Under torchrun (WORLD_SIZE > 1) each process embeds a contiguous
    shard on its own GPU (or the CPU, with gloo) and rank 0 merges; the output folder must be on a file
    system every process sees. Returns the meta dict. options: the fields of EmbedConfig.
    """
    cfg = EmbedConfig(**options)
    if cfg.dtype not in DTYPES:
        raise MixretError(f"unknown dtype {cfg.dtype!r}; expected one of {', '.join(DTYPES)}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load(model_dir)
    spec = resolve_spec(model, cfg.pooling, cfg.max_length)
    pooling, max_length = spec.pooling, check_options(model, cfg.batch_size, spec.max_length, spec.pooling)
    io.check_out_dir(out_dir, META_NAME, "embeddings", cfg.overwrite, what="embeddings")
    corpus_data = read_corpus(corpus, cfg.field, cfg.id_field)
    if corpus_data.skipped:
        warnings.warn(f"{corpus}: skipped {corpus_data.skipped} records with empty {cfg.field!r} text", stacklevel=2)

    with Distributed.from_env() as dist:
        device = pick_device(model, cfg.device if cfg.device is not None else dist.device)
        n = len(corpus_data.texts)
        lo, hi = n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size

        def make_temp() -> str:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            return str(io.temp_dir(out_dir.parent, out_dir.name, suffix=".partial"))

        tmp = Path(dist.broadcast_text(dist.on_main(make_temp) or ""))
        try:
            def embed_shard() -> tuple[torch.Tensor, int]:
                # rank 0 only; None: shown on a terminal
                disable = None if cfg.show_progress_bar is None else not cfg.show_progress_bar
                with tqdm(total=hi - lo, unit="text", desc="embed", disable=disable if dist.main else True) as bar:
                    return encode_texts(model, corpus_data.texts[lo:hi], cfg.batch_size, max_length, pooling, device,
                                        bar)

            E, truncated = dist.run(embed_shard)  # a failure on one rank fails every rank, with its message
            if dist.world_size > 1:
                E, truncated = gather_shards(dist, tmp, E, truncated)

            def publish() -> dict:
                meta = emb_meta(model_dir, model, corpus, cfg.field, cfg.id_field, pooling, max_length, cfg.dtype,
                                count=E.shape[0], truncated=truncated, skipped=corpus_data.skipped)
                write_emb_dir(tmp, E.to(DTYPES[cfg.dtype]), corpus_data.ids, corpus_data.texts, meta)
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

    kept = f"[bos] + the first {max_length - 1} text tokens" if pooling != "eos" else \
        f"[bos] + the first {max_length - 2} text tokens + [eos]"
    return {
        "kind": "embeddings",
        "mixret_version": __version__,
        "model_path": str(model_dir.resolve()),
        "model_hash": model.weights_hash,
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




def load_emb_dir(directory: str | os.PathLike) -> tuple[np.ndarray, list[str], list[str], dict]:
    """(embeddings [N, D] float32, ids, texts, meta) of an EMB_DIR written by embed_corpus, in the version its
    meta.json names (updates by `mixret index --add/--delete` write new versions; see mixret.retrieval.corpus)."""
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


def load_model_checked(model_dir: str | os.PathLike, emb_meta: dict | None = None, emb_dir=None):
    """Load the language model in model_dir (its weights hash is model.weights_hash); refuse it when emb_meta (the
    meta.json of the EMB_DIR it will be searched against) names another model or dim."""
    model = load(model_dir)
    if emb_meta is not None:
        meta_path = Path(emb_dir) / "meta.json" if emb_dir is not None else "the embeddings"
        EmbeddingSpec.of(emb_meta).check(EmbeddingSpec(model.weights_hash, None, None),
                                         f"the corpus embeddings ({meta_path}, made by "
                                         f"{emb_meta.get('model_path', 'a model of unknown path')})",
                                         f"the query encoder {model_dir}")
        dim = emb_meta.get("dim")
        if dim is not None and dim != model.config.d_model:
            raise MixretError(f"{meta_path}: the corpus embeddings have dim {dim} but {model_dir} gives "
                              f"{model.config.d_model}-dim embeddings")
    return model


def load_matcher_checked(matcher_dir: str | os.PathLike, spec=None, what: str = "the corpus embeddings"):
    """Load a matcher; refuse it when the embeddings it was trained on differ from `spec` (a
    mixret.models.encode.EmbeddingSpec, described as `what`) in model, pooling or max_length."""
    matcher = Matcher.from_pretrained(matcher_dir)
    if spec is not None:
        spec.check(matcher_spec(matcher), what, f"the matcher {matcher_dir}")
    return matcher


def matcher_spec(matcher):
    """The EmbeddingSpec of the embeddings a matcher was trained on."""
    return EmbeddingSpec.of(matcher.config.to_dict())
