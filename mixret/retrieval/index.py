"""The vector index: FAISS from a factory string, with ids, deletes, saving and the checks that tie an index to
the model, pooling and max length of its embeddings."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from mixret import io
from mixret.errors import MixretError
from mixret.io import versioned
from mixret.models.encode import EmbeddingSpec

INDEX_NAME = "index.faiss"


INDEX_META_NAME = "index.json"


INDEX_ROWS_NAME = "index.rows.safetensors"   # the label map of an updated approximate index


IVF_MIN_POINTS_PER_LIST = 39   # FAISS's own minimum of training points per k-means centroid


IVF_NPROBE = 16                # inverted lists visited per query (at most nlist)


HNSW_EF_SEARCH = 64            # HNSW search breadth (raised to k when k is larger)


def _as_matrix(x, what: str) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] == 0:
        raise MixretError(f"{what} must be a [N, D] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise MixretError(f"{what} contain NaN or infinite values")
    return x


def _normalized(x: np.ndarray) -> np.ndarray:
    import faiss
    x = x.copy()
    faiss.normalize_L2(x)
    return x


def prepared(embeddings, metric: str, normalize: bool | None) -> tuple[np.ndarray, bool]:
    """Embeddings [N, D] as an index holds them for `metric` (ip: L2-normalised unless normalize says otherwise)
    -> (vectors, normalize)."""
    x = _as_matrix(embeddings, "embeddings")
    if metric not in ("ip", "l2"):
        raise MixretError(f"unknown metric {metric!r}; expected 'ip' or 'l2'")
    normalize = metric == "ip" if normalize is None else normalize
    return (_normalized(x) if normalize else x), normalize


def _fit_factory(factory: str, count: int, dim: int) -> str:
    """The factory string, with IVF nlist shrunk (with a warning) to what `count` vectors can train.

    An IVF index with nlist lists needs IVF_MIN_POINTS_PER_LIST * nlist training vectors; with fewer,
    nlist becomes count // IVF_MIN_POINTS_PER_LIST (at least 1). PQ needs dim divisible by its
    number of sub-quantizers and 2**nbits training vectors; otherwise it is an error.
    """
    m = re.search(r"IVF(\d+)", factory)
    if m:
        nlist = int(m.group(1))
        if count < IVF_MIN_POINTS_PER_LIST * nlist:
            fitted = max(1, count // IVF_MIN_POINTS_PER_LIST)
            warnings.warn(f"{m.group(0)} needs at least {IVF_MIN_POINTS_PER_LIST * nlist} vectors to train, "
                          f"the corpus has {count}: using IVF{fitted} instead", stacklevel=3)
            factory = factory[:m.start()] + f"IVF{fitted}" + factory[m.end():]
    m = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    if m:
        n_sub, nbits = int(m.group(1)), int(m.group(2) or 8)
        if dim % n_sub:
            raise MixretError(f"FAISS factory {factory!r}: {m.group(0)} splits vectors into {n_sub} parts, "
                              f"but the embedding dim {dim} is not divisible by {n_sub}")
        if count < 2 ** nbits:
            raise MixretError(f"FAISS factory {factory!r}: {m.group(0)} trains {2 ** nbits} centroids per part "
                              f"and needs at least {2 ** nbits} vectors, the corpus has {count} "
                              f"(use Flat or HNSW32 for a corpus this small)")
    return factory


class VectorIndex:
    """A FAISS index over corpus embeddings, with the facts needed to check it matches its queries."""
    backends: dict = {}  # backend name -> its index class, beside faiss (mixret.retrieval.milvus adds milvus)

    backend = "faiss"

    def __init__(self, index, factory: str, metric: str, normalize: bool, meta: dict | None = None,
                 rows: np.ndarray | None = None):
        self.index = index
        self.factory = factory
        self.metric = metric
        self.normalize = normalize
        self.meta = dict(meta or {})
        self.rows = rows    # FAISS label -> corpus row, -1 for a removed vector; None: the label is the row

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def count(self) -> int:
        """Vectors searched: those of the corpus (removed ones left in an updated approximate index not counted)."""
        return self.index.ntotal if self.rows is None else int((self.rows >= 0).sum())

    @property
    def removed(self) -> int:
        """Vectors an update removed from the corpus that an approximate index still holds (see `updated`)."""
        return self.index.ntotal - self.count

    @property
    def exact(self) -> bool:
        """Whether this is a Flat index, which `updated` rebuilds (exact search, nothing left behind)."""
        return self.factory == "Flat"

    def close(self) -> None:
        """Let go of what the index holds outside this object (nothing for FAISS; see mixret.retrieval.milvus)."""

    def updated(self, embeddings: np.ndarray, keep: np.ndarray, added: np.ndarray) -> "VectorIndex":
        """The index of a corpus after an update, this one left untouched (searches may be running on it).

        embeddings [N', D]: the whole new corpus; keep [N]: the new row of each old row (-1: deleted, or replaced by
        a new vector); added [n]: the new rows whose vectors are new. A Flat index is built again from the
        embeddings, exactly as `build` would; any other (IVF, HNSW, PQ) is copied and the new vectors join its
        trained structure, while deleted or replaced vectors stay in it, never returned (a label map sends them to
        -1): search then costs what the larger index costs, and the IVF centroids or HNSW graph were fitted to the
        old corpus, so rebuild (`mixret index EMB_DIR --factory ...`) when many were removed or added."""
        import faiss
        x = _as_matrix(embeddings, "embeddings")
        if self.exact:
            return VectorIndex.build(x, self.factory, self.metric, self.normalize, self.meta)
        index = faiss.clone_index(self.index)
        new = x[np.asarray(added, dtype=np.int64)]
        if len(new):
            index.add(_normalized(new) if self.normalize else new)
        keep = np.asarray(keep, dtype=np.int64)
        old = keep if self.rows is None else np.where(self.rows >= 0, keep[np.maximum(self.rows, 0)], -1)
        rows = np.concatenate([old, np.asarray(added, dtype=np.int64)])
        return VectorIndex(index, self.factory, self.metric, self.normalize, self.meta, rows)

    @classmethod
    def build(cls, embeddings, factory: str = "Flat", metric: str = "ip", normalize: bool | None = None,
              meta: dict | None = None) -> "VectorIndex":
        """Index embeddings [N, D]. normalize (default: metric == "ip") L2-normalises the vectors;
        IVF and PQ indexes are trained on the embeddings themselves."""
        import faiss
        x, normalize = prepared(embeddings, metric, normalize)
        fitted = _fit_factory(factory, len(x), x.shape[1])
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        try:
            index = faiss.index_factory(x.shape[1], fitted, faiss_metric)
        except RuntimeError as e:
            raise MixretError(f"invalid FAISS factory string {factory!r} ({_faiss_message(e)}); "
                              f"expected e.g. Flat, HNSW32, IVF1024,Flat or IVF4096,PQ32") from None
        if hasattr(index, "pq"):
            _quiet_pq_training(index.pq, len(x), fitted)
        if hasattr(index, "do_polysemous_training"):
            index.do_polysemous_training = False  # polysemous codes are never used by search; training them is slow
        try:
            if not index.is_trained:
                index.train(x)
            index.add(x)
        except RuntimeError as e:
            raise MixretError(f"cannot build FAISS index {fitted!r} on {len(x)} vectors: {_faiss_message(e)}") from None
        return cls(index, fitted, metric, normalize, meta)

    def checked_queries(self, queries, k: int) -> np.ndarray:
        """queries [Q, D] as the index searches them (normalised for ip), after checking their dim and k."""
        q = _as_matrix(queries, "query embeddings")
        if q.shape[1] != self.dim:
            raise MixretError(f"query embeddings have dim {q.shape[1]} but the index has dim {self.dim} "
                              f"(embed queries with the model that embedded the corpus)")
        if not 1 <= k <= self.count:
            raise MixretError(f"k must be between 1 and the corpus size {self.count}, got {k}")
        if self.normalize:
            q = _normalized(q)
        return q

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> (scores [Q, k] float32, indices [Q, k] int64; -1 where an approximate
        index found fewer than k). Scores are inner products, or squared L2 distances (lower is nearer)."""
        import faiss
        q = self.checked_queries(queries, k)
        depth = min(k + self.removed, self.index.ntotal)   # removed vectors may take places in the top k
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = min(IVF_NPROBE, ivf.nlist)
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, depth)
        scores, labels = self.index.search(q, depth)
        if self.rows is None:
            return scores, labels.astype(np.int64)
        return _live_rows(scores, labels, self.rows, k, self.metric)

    def similarity(self, queries: np.ndarray, corpus: np.ndarray, cands: np.ndarray) -> np.ndarray:
        """Exact scores [Q, N] of corpus rows cands [Q, N] (-1 = none: 0) for queries [Q, D], on the index's scale
        (higher is nearer): cosine or inner product, or minus the squared L2 distance."""
        q = _normalized(queries) if self.normalize else queries
        rows = corpus[np.where(cands >= 0, cands, 0)]                          # [Q, N, D]
        if self.normalize:
            rows = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
        if self.metric == "ip":
            sims = np.einsum("qd,qnd->qn", q, rows)
        else:
            sims = -((rows - q[:, None]) ** 2).sum(-1)
        return np.where(cands >= 0, sims, 0.0).astype(np.float32)

    # -- save / load --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, version: int = 0) -> list[str]:
        """Write directory/index.faiss (with a label map, index.rows.safetensors), then index.json, each atomically;
        an EMB_DIR's version > 0 (see mixret.retrieval.corpus) puts the version in each name -> the names written."""
        import faiss
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = [versioned(INDEX_NAME, version), versioned(INDEX_META_NAME, version)]
        with io.atomic_path(directory / names[0]) as tmp:
            faiss.write_index(self.index, tmp)
        if self.rows is not None:
            names.insert(1, versioned(INDEX_ROWS_NAME, version))
            with io.atomic_path(directory / names[1]) as tmp:
                save_file({"rows": np.ascontiguousarray(self.rows, dtype=np.int64)}, tmp)
        io.write_json(directory / names[-1], {
            **self.meta, "factory": self.factory, "metric": self.metric, "normalize": self.normalize,
            "dim": self.dim, "count": self.count, "removed": self.removed,
        })
        return names

    @classmethod
    def load(cls, directory: str | os.PathLike, expected_dim: int | None = None,
             expected_spec=None, expected_count: int | None = None, version: int = 0) -> "VectorIndex":
        """Read an index written by `save` (of the EMB_DIR's `version`); refuse one whose dim or size differ from the
        expected, or whose embeddings differ from expected_spec (a mixret.models.encode.EmbeddingSpec: model hash,
        pooling,
        max_length)."""
        import faiss

        directory = Path(directory)
        meta_path = directory / versioned(INDEX_META_NAME, version)
        index_path = directory / versioned(INDEX_NAME, version)
        backend = io.read_json(meta_path, "index metadata").get("backend", "faiss") if meta_path.is_file() else "faiss"
        for path in (meta_path, index_path) if backend == "faiss" else (meta_path,):
            if not path.is_file():
                raise MixretError(f"{path}: index file not found (build the index with `mixret index {directory}`)")
        meta = io.read_json(meta_path, "index metadata")
        missing = [key for key in ("factory", "metric", "normalize", "dim", "count") if key not in meta]
        if missing:
            raise MixretError(f"{meta_path}: index metadata lacks {', '.join(missing)} "
                              f"(rebuild it with `mixret index {directory}`)")
        if expected_dim is not None and meta["dim"] != expected_dim:
            raise MixretError(f"{meta_path}: the index holds {meta['dim']}-dim vectors but the model gives "
                              f"{expected_dim}-dim embeddings: it was built from another model")
        if expected_spec is not None:
            expected_spec.check(EmbeddingSpec.of(meta), f"the corpus embeddings in {directory}",
                                f"the index {meta_path} (rebuild it with `mixret index {directory}`)")
        if expected_count is not None and meta["count"] != expected_count:
            raise MixretError(f"{meta_path}: the index holds {meta['count']} vectors but the corpus has "
                              f"{expected_count} (rebuild it with `mixret index {directory}`)")
        if backend != "faiss":
            if backend not in cls.backends:
                raise MixretError(f"{meta_path}: unknown index backend {backend!r}; expected faiss or "
                                  f"{' or '.join(cls.backends) or 'milvus (import mixret.retrieval.milvus)'}")
            return cls.backends[backend].from_meta(meta, meta_path, directory)
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as e:
            raise MixretError(f"{index_path}: cannot read FAISS index ({_faiss_message(e)})") from None
        held = meta["count"] + meta.get("removed", 0)
        if index.d != meta["dim"] or index.ntotal != held:
            raise MixretError(f"{index_path}: holds {index.ntotal} vectors of dim {index.d} but {meta_path} "
                              f"says {held} of dim {meta['dim']} (rebuild it with `mixret index {directory}`)")
        rows = _load_rows(directory / versioned(INDEX_ROWS_NAME, version), index.ntotal) if meta.get("removed") or \
            (directory / versioned(INDEX_ROWS_NAME, version)).is_file() else None
        known = ("factory", "metric", "normalize", "dim", "count", "removed")
        found = cls(index, meta["factory"], meta["metric"], bool(meta["normalize"]),
                    {k: v for k, v in meta.items() if k not in known}, rows)
        if found.count != meta["count"]:
            raise MixretError(f"{index_path}: its label map keeps {found.count} vectors but {meta_path} says "
                              f"{meta['count']} (rebuild it with `mixret index {directory}`)")
        return found


def _load_rows(path: Path, labels: int) -> np.ndarray:
    """The label map of an updated approximate index: [labels] int64 corpus rows, -1 for removed vectors."""
    from safetensors import safe_open
    if not path.is_file():
        raise MixretError(f"{path}: label map of an updated index not found (rebuild the index with `mixret index`)")
    try:
        with safe_open(str(path), framework="np") as f:
            rows = f.get_tensor("rows")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise MixretError(f"{path}: cannot read the index's label map ({e})") from None
    if rows.shape != (labels,):
        raise MixretError(f"{path}: a label map of shape {rows.shape}; expected ({labels},), one row per vector")
    return rows.astype(np.int64)


def _live_rows(scores: np.ndarray, labels: np.ndarray, rows: np.ndarray, k: int,
               metric: str) -> tuple[np.ndarray, np.ndarray]:
    """FAISS results [Q, depth] -> the first k whose label maps to a corpus row, as (scores, rows) [Q, k]; -1
    (and FAISS's own filler score, the worst float32) where fewer were found."""
    mapped = np.where(labels >= 0, rows[np.maximum(labels, 0)], -1)
    worst = np.finfo(np.float32).max * (-1 if metric == "ip" else 1)
    out_s = np.full((len(labels), k), worst, dtype=np.float32)
    out_i = np.full((len(labels), k), -1, dtype=np.int64)
    for q in range(len(labels)):
        live = np.flatnonzero(mapped[q] >= 0)[:k]
        out_s[q, :len(live)], out_i[q, :len(live)] = scores[q, live], mapped[q, live]
    return out_s, out_i


def _quiet_pq_training(pq, count: int, factory: str) -> None:
    """One Python warning, instead of one FAISS message per sub-quantizer, when PQ training is thin."""
    wanted = IVF_MIN_POINTS_PER_LIST * pq.ksub
    if count < wanted:
        warnings.warn(f"{factory}: product quantizer trains {pq.ksub} centroids per part on {count} vectors "
                      f"(FAISS recommends at least {wanted}); its distances will be coarse", stacklevel=4)
        pq.cp.min_points_per_centroid = 1


def _faiss_message(e: Exception) -> str:
    """The first informative line of a FAISS C++ exception."""
    text = " ".join(str(e).split())
    m = re.search(r" at \S+:\d+: (.*)", text)
    return (m.group(1) if m else text) or type(e).__name__
