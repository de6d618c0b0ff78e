"""A Milvus collection as the vector index of an EMB_DIR: `mixret index EMB_DIR --backend milvus --uri URI`.

The same client (pymilvus's MilvusClient) reaches Milvus Lite, an embedded database in one local file (URI: a
path ending in .db; what the tests use), and a Milvus server or cluster (URI: http://HOST:19530), so a corpus that
outgrows one machine keeps mixret's models in front of a distributed vector database. The collection holds one
entity a corpus row: `row` (INT64, the primary key: the row of ids.jsonl) and `vec` (FLOAT_VECTOR), indexed FLAT,
so search is exact and answers the top k of FAISS's Flat index (a test checks it); with metric ip the vectors and
queries are L2-normalised first, as for FAISS. index.json records {"backend": "milvus", "uri", "collection", the
metric, dim, count and the embeddings' spec}; there is no index.faiss.

pymilvus and milvus-lite are imported only when this backend is used (they are in mixret's dev extra). Updates
(`index --add/--delete`, writes to `serve`) keep to the FAISS backend for now: they are refused with what to do.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mixret import io
from mixret.errors import MixretError
from mixret.io import versioned
from mixret.retrieval.index import INDEX_META_NAME, VectorIndex, prepared

BACKENDS = ("faiss", "milvus")
INSERT_BATCH = 5000         # entities sent in one insert call
FIELD_ROW, FIELD_VEC = "row", "vec"


def check_uri(uri: str | None) -> str:
    """A Milvus URI: http(s)://HOST:PORT as given, or a local Milvus Lite file (made absolute; it must end in .db)."""
    if not uri:
        raise MixretError("--backend milvus needs --uri: a local file ending in .db (Milvus Lite) or "
                          "http://HOST:19530 (a Milvus server)")
    if re.match(r"^(https?|tcp|unix)://", uri):
        return uri
    path = Path(uri).expanduser().resolve()
    if path.suffix != ".db":
        raise MixretError(f"--uri {uri}: a local Milvus Lite database is a file ending in .db; expected e.g. "
                          f"{path.with_suffix('.db')} (or http://HOST:19530 for a Milvus server)")
    if not path.parent.is_dir():
        raise MixretError(f"--uri {uri}: folder {path.parent} not found")
    return str(path)


def default_collection(emb_dir) -> str:
    """mixret_ + the EMB_DIR's folder name, reduced to what Milvus allows (letters, digits, underscores)."""
    return "mixret_" + (re.sub(r"\W", "_", Path(emb_dir).resolve().name, flags=re.ASCII) or "corpus")


def connect(uri: str):
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise MixretError("the milvus backend needs pymilvus and milvus-lite: pip install 'pymilvus>=3.0.2' "
                          "'milvus-lite>=3.2.2' (both are in mixret's dev extra)") from None
    try:
        return MilvusClient(uri)
    except Exception as e:   # pymilvus raises its own error types
        raise MixretError(f"cannot open the Milvus database {uri} ({type(e).__name__}: {e}); a Milvus Lite file "
                          f"is opened by one process at a time") from None


class MilvusIndex(VectorIndex):
    """The VectorIndex interface (search, similarity, save, load) over a Milvus collection, FLAT (exact)."""
    backend = "milvus"

    def __init__(self, client, uri: str, collection: str, metric: str, normalize: bool, dim: int, count: int,
                 meta: dict | None = None):
        super().__init__(None, "FLAT", metric, normalize, meta)
        self.client, self.uri, self.collection = client, uri, collection
        self._dim, self._count = dim, count

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def count(self) -> int:
        return self._count

    @property
    def exact(self) -> bool:
        return True

    @property
    def milvus_metric(self) -> str:
        return "IP" if self.metric == "ip" else "L2"

    @classmethod
    def build(cls, embeddings, uri: str, collection: str, metric: str = "ip", normalize: bool | None = None,
              meta: dict | None = None) -> "MilvusIndex":
        """Put embeddings [N, D] into `collection` at `uri` (replacing a collection of that name), rows as keys."""
        from pymilvus import DataType
        x, normalize = prepared(embeddings, metric, normalize)
        client = connect(uri)
        found = cls(client, uri, collection, metric, normalize, x.shape[1], len(x), meta)
        if client.has_collection(collection):
            client.drop_collection(collection)
        schema = client.create_schema(auto_id=False)
        schema.add_field(FIELD_ROW, DataType.INT64, is_primary=True)
        schema.add_field(FIELD_VEC, DataType.FLOAT_VECTOR, dim=x.shape[1])
        params = client.prepare_index_params()
        params.add_index(field_name=FIELD_VEC, index_type="FLAT", metric_type=found.milvus_metric)
        client.create_collection(collection, schema=schema, index_params=params)
        for start in range(0, len(x), INSERT_BATCH):
            rows = x[start:start + INSERT_BATCH]
            client.insert(collection, [{FIELD_ROW: start + i, FIELD_VEC: v} for i, v in enumerate(rows.tolist())])
        client.flush(collection)
        client.load_collection(collection)
        return found

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.checked_queries(queries, k)
        found = self.client.search(self.collection, data=q.tolist(), limit=k, anns_field=FIELD_VEC,
                                   output_fields=[FIELD_ROW], search_params={"metric_type": self.milvus_metric})
        worst = np.finfo(np.float32).max * (-1 if self.metric == "ip" else 1)
        scores = np.full((len(q), k), worst, dtype=np.float32)
        rows = np.full((len(q), k), -1, dtype=np.int64)
        for i, hits in enumerate(found):
            for j, hit in enumerate(list(hits)[:k]):
                scores[i, j], rows[i, j] = hit["distance"], hit[FIELD_ROW] if FIELD_ROW in hit else hit["id"]
        return scores, rows

    def close(self) -> None:
        """Close the client and, for a Milvus Lite file, stop this process's server of it, so that another
        process may open the file."""
        self.client.close()
        if "://" not in self.uri:
            from milvus_lite.server_manager import server_manager_instance
            server_manager_instance.release_server(self.uri)

    def updated(self, embeddings, keep, added) -> "VectorIndex":
        raise MixretError(f"this EMB_DIR's index is the Milvus collection {self.collection} at {self.uri}: updates "
                          f"keep to the FAISS backend for now; update with a FAISS index (`mixret index EMB_DIR`), "
                          f"then put the result into Milvus again (`mixret index EMB_DIR --backend milvus --uri ...`)")

    def save(self, directory, version: int = 0) -> list[str]:
        name = versioned(INDEX_META_NAME, version)
        io.write_json(Path(directory) / name, {
            **self.meta, "backend": "milvus", "uri": self.uri, "collection": self.collection,
            "factory": self.factory, "metric": self.metric, "normalize": self.normalize, "dim": self.dim,
            "count": self.count, "removed": 0})
        return [name]

    @classmethod
    def from_meta(cls, meta: dict, meta_path: Path, directory) -> "MilvusIndex":
        """The collection index.json names, checked to hold its count of vectors."""
        missing = [key for key in ("uri", "collection", "metric", "normalize", "dim", "count") if key not in meta]
        if missing:
            raise MixretError(f"{meta_path}: a Milvus index record lacks {', '.join(missing)} (index the folder again "
                              f"with `mixret index {directory} --backend milvus --uri URI`)")
        client = connect(meta["uri"])
        collection = meta["collection"]
        if not client.has_collection(collection):
            raise MixretError(f"{meta_path}: the Milvus database {meta['uri']} has no collection {collection!r} (index "
                              f"the folder again with `mixret index {directory} --backend milvus --uri URI`)")
        held = int(client.get_collection_stats(collection)["row_count"])
        if held != meta["count"]:
            raise MixretError(f"{meta_path}: the collection {collection!r} holds {held} vectors but the index record "
                              f"says {meta['count']} (index the folder again)")
        client.load_collection(collection)
        known = ("backend", "uri", "collection", "factory", "metric", "normalize", "dim", "count", "removed")
        return cls(client, meta["uri"], collection, meta["metric"], bool(meta["normalize"]), meta["dim"],
                   meta["count"], {k: v for k, v in meta.items() if k not in known})


VectorIndex.backends["milvus"] = MilvusIndex
