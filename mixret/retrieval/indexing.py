"""`build_index(IndexConfig(...))`: what `mixret index` does, from Python.

Without add or delete: a vector index (FAISS from a factory string, or a Milvus collection) over the embeddings of
an EMB_DIR, saved there, with the BM25 parameters fitted with its model copied beside it. With add and/or delete:
the folder updated instead (only the new texts embedded; mixret.retrieval.corpus.update_folder).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mixret.errors import MixretError
from mixret.models.encode import EmbeddingSpec
from mixret.options import option
from mixret.retrieval.bm25 import copy_to_emb_dir
from mixret.retrieval.corpus import WriteLock, clear_log, load_snapshot, update_folder, write_version
from mixret.retrieval.index import INDEX_NAME, INDEX_ROWS_NAME, VectorIndex
from mixret.retrieval.milvus import BACKENDS, MilvusIndex, check_uri, default_collection


@dataclass
class IndexConfig:
    """Everything `mixret index` takes besides EMB_DIR."""
    factory: str = option("Flat", "FAISS index factory string: Flat, HNSW32, IVF1024,Flat, IVF4096,PQ32, ... (a "
                                  "rebuild).")
    metric: str = option("ip", "ip: inner product of L2-normalised embeddings (cosine); l2: Euclidean distance.",
                         choices=("ip", "l2"))
    backend: str = option("faiss", "Where the vectors go: faiss, an index file in EMB_DIR; milvus, a Milvus "
                                   "collection at --uri (FLAT: exact search), for a corpus beyond one machine.",
                          choices=BACKENDS)
    uri: str | None = option(None, "--backend milvus: a local Milvus Lite file ending in .db, or http://HOST:19530 "
                                   "for a Milvus server or cluster.")
    collection: str | None = option(None, "--backend milvus: the collection (replaced if it exists).",
                                    show="mixret_ + EMB_DIR's folder name")
    add: str | None = option(None, "Add the texts of this corpus file (any format `mixret embed` reads); a text "
                                   "whose id is in EMB_DIR replaces it. Only these texts are embedded.")
    delete: str | None = option(None, "Delete the ids listed in this file, one a line (applied before --add).")
    field: str = option("text", "--add: the field holding the texts.")
    id_field: str = option("id", "--add: the field holding the ids.")
    model: str | None = option(None, "--add: the model folder, if it moved (other weights are refused).",
                               show="the one named in EMB_DIR/meta.json")
    batch_size: int = option(64, "--add: texts per forward pass.")
    device: str | None = option(None, "--add: torch device.", show="the GPU if there is one")


def build_index(emb_dir: str | Path, cfg: IndexConfig = IndexConfig()) -> dict:
    """Index the EMB_DIR (or update it, with cfg.add / cfg.delete) as `mixret index` does -> a report: with an
    update, update_folder's; else {"index": the index (closed), "bm25": the BM25 parameters now in EMB_DIR}."""
    if cfg.add is not None or cfg.delete is not None:
        return update_folder(emb_dir, cfg.add, cfg.delete, cfg.field, cfg.id_field, cfg.model, cfg.batch_size,
                             cfg.device)
    with WriteLock(emb_dir):
        snap, replayed = load_snapshot(emb_dir, with_index=False)
        meta = snap.meta
        record = {**EmbeddingSpec.of(meta).to_dict(), "model_path": meta.get("model_path")}
        if cfg.backend == "milvus":
            if cfg.factory != "Flat":
                raise MixretError(f"--backend milvus indexes FLAT (exact search); --factory {cfg.factory} is for "
                                  "faiss")
            index = MilvusIndex.build(snap.emb, check_uri(cfg.uri), cfg.collection or default_collection(emb_dir),
                                      cfg.metric, meta=record)
        elif cfg.uri is not None or cfg.collection is not None:
            raise MixretError("--uri and --collection go with --backend milvus")
        else:
            index = VectorIndex.build(snap.emb, cfg.factory, cfg.metric, meta=record)
        if snap.version == 0 and not replayed:
            index.save(emb_dir)
            if cfg.backend == "milvus":    # its record replaces a FAISS index
                for name in (INDEX_NAME, INDEX_ROWS_NAME):
                    (Path(emb_dir) / name).unlink(missing_ok=True)
        else:   # an updated folder: the new index is a new version
            write_version(emb_dir, dataclasses.replace(snap, index=index),
                          {"rebuilt": index.factory, "log_writes": replayed})
            if replayed:
                clear_log(emb_dir)
        bm25 = copy_to_emb_dir(emb_dir, meta)
        index.close()
    return {"index": index, "bm25": bm25}
