"""Search a corpus of embeddings five ways: vector (FAISS), fusion, tree (matcher tournament), hybrid, bm25.

- vector: FAISS top-k over the corpus embeddings, the index built from a factory string
  ("Flat", "HNSW32", "IVF1024,Flat", "IVF4096,PQ32", ...). With metric "ip" the corpus and the
  queries are L2-normalised first (cosine similarity).
- tree: a knockout tournament over the whole corpus with the matcher, no vector index.
- hybrid: a shortlist from the vector index (or BM25), ranked by the same tournament.
- bm25: BM25 over the corpus texts with bm25s (English stopwords, Snowball stems), a lexical baseline; its k1,
  b and stemmer are the ones fitted with the model when `mixret index` put them in EMB_DIR (see mixret.bm25).
- fusion: BM25 and the dense similarity combined over both sides' top candidates (see mixret.fusion).

Equal scores are ranked by corpus index (lower first) in bm25 mode, as FAISS's Flat index does.

The tournament. The matcher scores one query against up to G = context-1 candidates at once, and
its logits are relative to the other candidates of the set (softmax over the slots), so logits from
different sets are never compared. Each round takes the survivors in order, splits off as many full
groups of G as there are, scores every group of every query in one batched call and keeps the top k
of each group; the survivors that did not fill a group wait for the next round. When at most G
survivors are left, one last pass over them gives the final ranking and scores. Every pass but the
last turns G candidates into k, so a corpus of M > G costs

    passes(M, k, G) = ceil((M - k) / (G - k))     (1 when M <= G)

matcher forward passes per query: ceil((M - 1) / (context - 2)) for k = 1. It needs k < G when
M > G. When the matcher's logit for a candidate does not depend on the other candidates, the top k
of the corpus are never knocked out (each is in the top k of every group it plays in), so the
tournament returns exactly the corpus top k.

Ties. A search breaks ties between equal scores in whatever order its library returns them. An
evaluation must not let that order favour the relevant document, so every search takes `losers`: one
corpus row per query that loses every tie (evaluation passes the query's relevant document). The
tournament sorts each group by score, then the loser last among equal scores; vector and bm25 search
fetch one result beyond k (and a hybrid shortlist one beyond its size) and move the loser behind every
result that scores the same (`pessimistic_cut`), so a loser tied with the first result left out is
left out too. With constant scores the loser is therefore never found.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from mixret import io
from mixret.errors import MixretError

INDEX_NAME = "index.faiss"
INDEX_META_NAME = "index.json"
INDEX_ROWS_NAME = "index.rows.safetensors"   # the label map of an updated approximate index
MODES = ("vector", "fusion", "tree", "hybrid", "bm25")
SHORTLIST_SOURCES = ("vector", "bm25")
IVF_MIN_POINTS_PER_LIST = 39   # FAISS's own minimum of training points per k-means centroid
IVF_NPROBE = 16                # inverted lists visited per query (at most nlist)
HNSW_EF_SEARCH = 64            # HNSW search breadth (raised to k when k is larger)
BM25_K1, BM25_B = 1.5, 0.75    # bm25s's own defaults: BM25 when nothing was fitted (see mixret.bm25)

# score_fn(queries [B, E], candidates [B, N, E], mask [B, N] bool, bm25 [B, N] or None) -> logits [B, N];
# bm25: the candidates' BM25 scores for their query, given to the tournament for a matcher that takes them
ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


# -- vector index -----------------------------------------------------------------------------

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
        """Let go of what the index holds outside this object (nothing for FAISS; see mixret.milvus)."""

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
        x = _as_matrix(embeddings, "embeddings")
        if metric not in ("ip", "l2"):
            raise MixretError(f"unknown metric {metric!r}; expected 'ip' or 'l2'")
        normalize = metric == "ip" if normalize is None else normalize
        if normalize:
            x = _normalized(x)
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

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> (scores [Q, k] float32, indices [Q, k] int64; -1 where an approximate
        index found fewer than k). Scores are inner products, or squared L2 distances (lower is nearer)."""
        import faiss
        q = _as_matrix(queries, "query embeddings")
        if q.shape[1] != self.dim:
            raise MixretError(f"query embeddings have dim {q.shape[1]} but the index has dim {self.dim} "
                              f"(embed queries with the model that embedded the corpus)")
        if not 1 <= k <= self.count:
            raise MixretError(f"k must be between 1 and the corpus size {self.count}, got {k}")
        if self.normalize:
            q = _normalized(q)
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
        an EMB_DIR's version > 0 (see mixret.corpus) puts the version in each name -> the names written."""
        import faiss
        from safetensors.numpy import save_file

        from mixret.embed import versioned
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
        expected, or whose embeddings differ from expected_spec (a mixret.embed.EmbeddingSpec: model hash, pooling,
        max_length)."""
        import faiss

        from mixret.embed import EmbeddingSpec, versioned
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
        if backend == "milvus":
            from mixret.milvus import MilvusIndex
            return MilvusIndex.from_meta(meta, meta_path, directory)
        if backend != "faiss":
            raise MixretError(f"{meta_path}: unknown index backend {backend!r}; expected faiss or milvus")
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


# -- BM25 -------------------------------------------------------------------------------------

class BM25Index:
    """BM25 (bm25s, Lucene variant) over texts tokenised with bm25s.tokenize, English stopwords removed and, with
    the stemmer on, every word reduced to its stem by the Snowball English stemmer (PyStemmer), so "queues"
    matches "queueing". k1 (term frequency saturation) and b (length normalisation) default to bm25s's own;
    mixret.bm25 fits all three on validation pairs."""

    def __init__(self, texts: Sequence[str], k1: float = BM25_K1, b: float = BM25_B, stemmer: bool = True,
                 keep_terms: bool = False):
        """keep_terms: keep each text's term statistics (its distinct term ids and their counts, and its length), so
        that `updated` follows writes without tokenising the corpus again (memory of the order of the corpus's
        distinct (text, term) pairs)."""
        import bm25s
        import Stemmer
        if len(texts) == 0:
            raise MixretError("cannot build a BM25 index over an empty corpus")
        self.count = len(texts)
        self.k1, self.b = k1, b
        self.stemmer = Stemmer.Stemmer("english") if stemmer else None
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.vocab: dict[str, int] | None = None
        self.doc_stats: list[tuple[np.ndarray, np.ndarray, int]] | None = None
        if keep_terms:
            self.vocab = {"": 0}   # bm25s's empty token, which no text holds
            self._index_stats(self._term_stats(texts))
        else:
            tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=self.stemmer, show_progress=False)
            self.retriever.index(tokens, show_progress=False)

    def _term_stats(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Each text's (distinct term ids int32, their counts float32, its number of terms), ids of self.vocab,
        which grows by the terms it did not hold."""
        vocab, out = self.vocab, []
        for words in self.tokenize(texts):
            ids = np.fromiter((vocab.setdefault(t, len(vocab)) for t in words), dtype=np.int64, count=len(words))
            terms, counts = np.unique(ids, return_counts=True)
            out.append((terms.astype(np.int32), counts.astype(np.float32), len(words)))
        return out

    def _index_stats(self, doc_stats: list[tuple[np.ndarray, np.ndarray, int]]) -> None:
        """Score every (text, term) from the texts' term statistics, all at once: document frequencies, IDF, the mean
        length and each score recomputed exactly as bm25s computes them text by text (the same float64 operations
        in the same order, then float32), into the same sparse matrix, so that scores equal a fresh index's."""
        import scipy.sparse as sp
        self.doc_stats, self.count = doc_stats, len(doc_stats)
        n, n_vocab = len(doc_stats), len(self.vocab)
        lengths = np.array([length for _, _, length in doc_stats], dtype=np.int64)
        sizes = np.array([len(terms) for terms, _, _ in doc_stats], dtype=np.int64)
        terms = np.concatenate([t for t, _, _ in doc_stats]) if sizes.sum() else np.zeros(0, np.int32)
        tf = np.concatenate([c for _, c, _ in doc_stats]).astype(np.float64) if sizes.sum() else np.zeros(0)
        docs = np.repeat(np.arange(n, dtype=np.int32), sizes)
        df = np.bincount(terms, minlength=n_vocab)
        idf = np.zeros(n_vocab, dtype=np.float32)
        held = np.flatnonzero(df)
        ratio = 1 + (n - df[held] + 0.5) / (df[held] + 0.5)          # bm25s: math.log(1 + (N - df + 0.5) / (df + 0.5))
        idf[held] = [math.log(r) for r in ratio.tolist()]
        norm = self.k1 * ((1 - self.b) + self.b * lengths / lengths.mean())   # per text, float64
        scores = (idf[terms].astype(np.float64) * (tf / (norm[docs] + tf))).astype(np.float32)
        matrix = sp.csc_matrix((scores, (docs, terms)), shape=(n, n_vocab), dtype=np.float32)
        r = self.retriever
        r.scores = {"data": matrix.data, "indices": matrix.indices, "indptr": matrix.indptr, "num_docs": n}
        r.vocab_dict, r.nonoccurrence_array = dict(self.vocab), None
        r.unique_token_ids_set = set(r.vocab_dict.values())

    def updated(self, keep: np.ndarray, texts: Sequence[str], added: np.ndarray) -> "BM25Index":
        """The BM25 of the corpus after an update (see VectorIndex.updated for keep and added; texts: the new
        corpus's), built from the kept term statistics: only the added texts are tokenised. Needs keep_terms."""
        if self.doc_stats is None:
            raise MixretError("this BM25 index was built without keep_terms; it cannot follow writes")
        import bm25s
        new = BM25Index.__new__(BM25Index)
        new.k1, new.b, new.stemmer = self.k1, self.b, self.stemmer
        new.retriever, new.vocab = bm25s.BM25(k1=self.k1, b=self.b), dict(self.vocab)
        doc_stats: list = [None] * len(texts)
        for old, row in enumerate(np.asarray(keep).tolist()):
            if row >= 0:
                doc_stats[row] = self.doc_stats[old]
        added = np.asarray(added, dtype=np.int64).tolist()
        for row, stats in zip(added, new._term_stats([texts[r] for r in added])):
            doc_stats[row] = stats
        if any(stats is None for stats in doc_stats):
            raise MixretError("BM25 update: a row of the new corpus is neither kept nor added")
        new._index_stats(doc_stats)
        return new

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every corpus text for one query -> [M] float32 (0 when no query term is indexed)."""
        return self.token_scores(self.tokenize([query])[0])

    def tokenize(self, queries: Sequence[str]) -> list[list[str]]:
        """Each query's words as the corpus's were tokenised (stopwords dropped, stemmed when the stemmer is on)."""
        import bm25s
        return bm25s.tokenize(list(queries), stopwords="en", stemmer=self.stemmer, return_ids=False,
                              show_progress=False)

    def token_scores(self, tokens: list[str]) -> np.ndarray:
        """`scores` of a query already tokenised by `tokenize` -> [M] float32."""
        known = [t for t in tokens if t in self.retriever.vocab_dict]
        if not known:
            return np.zeros(self.count, dtype=np.float32)
        return self.retriever.get_scores(known).astype(np.float32)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries -> (scores [Q, k] float32, indices [Q, k] int64), best first, equal scores by corpus index."""
        if not 1 <= k <= self.count:
            raise MixretError(f"k must be between 1 and the corpus size {self.count}, got {k}")
        out_scores = np.zeros((len(queries), k), dtype=np.float32)
        out_indices = np.zeros((len(queries), k), dtype=np.int64)
        for i, query in enumerate(queries):
            s = self.scores(query)
            top = np.argpartition(-s, k - 1)[:k] if k < self.count else np.arange(self.count)
            cut = s[top].min()                                   # every text scoring above the cut is in top
            tied = np.flatnonzero(s >= cut)                      # plus all texts tied at the cut
            order = tied[np.lexsort((tied, -s[tied]))][:k]
            out_scores[i], out_indices[i] = s[order], order
        return out_scores, out_indices

    def scores_of(self, queries: Sequence[str], cands: np.ndarray) -> np.ndarray:
        """BM25 scores [Q, N] of corpus rows cands [Q, N] (-1 = none: 0)."""
        out = np.zeros(cands.shape, dtype=np.float32)
        for i, (q, c) in enumerate(zip(queries, cands)):
            out[i] = np.where(c >= 0, self.scores(q)[np.where(c >= 0, c, 0)], 0.0)
        return out


# -- tournament -------------------------------------------------------------------------------

def tournament_passes(n: int, k: int, group_size: int) -> int:
    """Matcher forward passes per query of a tournament over n candidates (see the module docstring)."""
    if n <= 0:
        return 0
    if n <= group_size:
        return 1
    return math.ceil((n - k) / (group_size - k))


def check_tournament(n: int, k: int, group_size: int) -> None:
    if group_size < 2:
        raise MixretError(f"tournament groups need at least 2 candidates, got group size {group_size}")
    if k < 1:
        raise MixretError(f"k must be at least 1, got {k}")
    if n > group_size and k >= group_size:
        raise MixretError(f"the tournament keeps the top k of each group of {group_size} candidates "
                          f"(matcher context - 1), so k must be below {group_size}; got k={k}")


def tournament(score_fn: ScoreFn, queries, corpus, k: int, group_size: int,
               candidates: np.ndarray | None = None, bm25: np.ndarray | None = None,
               losers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank candidates for each query by a knockout tournament of matcher passes.

    queries [Q, E], corpus [M, E], candidates [Q, S] corpus indices (-1 = none; default: the whole
    corpus for every query), bm25 [Q, S] the candidates' BM25 scores (optional; they travel with their
    candidate to score_fn) -> (indices [Q, k'] int64, scores [Q, k'] float32, passes [Q] int64) with
    k' = min(k, S), best first; indices are -1 (scores -inf) where a query had fewer candidates.
    passes counts, per query, the groups holding at least one candidate. losers [Q]: a corpus row per
    query that is ranked after every candidate of its group with an equal score (see the module docstring).
    """
    q = np.asarray(queries, dtype=np.float32)
    corpus = np.asarray(corpus, dtype=np.float32)
    if candidates is None:
        candidates = np.broadcast_to(np.arange(len(corpus)), (len(q), len(corpus)))
    survivors = np.asarray(candidates, dtype=np.int64)                  # [Q, S]
    lex = None if bm25 is None else np.asarray(bm25, dtype=np.float32)  # [Q, S], aligned with survivors
    if lex is not None and lex.shape != survivors.shape:
        raise MixretError(f"the candidates' BM25 scores have shape {lex.shape}, the candidates {survivors.shape}")
    Q, G = len(q), group_size
    check_tournament(survivors.shape[1], k, G)
    if Q == 0:
        width = min(k, survivors.shape[1])
        return np.zeros((0, width), np.int64), np.zeros((0, width), np.float32), np.zeros(0, np.int64)
    passes = np.zeros(Q, dtype=np.int64)
    while survivors.shape[1] > G:
        n_groups = survivors.shape[1] // G
        groups = survivors[:, :n_groups * G].reshape(Q * n_groups, G)  # [Q*g, G]
        group_lex = None if lex is None else lex[:, :n_groups * G].reshape(Q * n_groups, G)
        logits = _score_groups(score_fn, np.repeat(q, n_groups, axis=0), corpus, groups, group_lex)
        passes += (groups >= 0).any(1).reshape(Q, n_groups).sum(1)
        group_losers = None if losers is None else np.repeat(losers, n_groups)
        best = _best_first(logits, groups, group_losers)[:, :k]         # [Q*g, k]
        winners = np.take_along_axis(groups, best, axis=1).reshape(Q, n_groups * k)
        survivors = np.concatenate([survivors[:, n_groups * G:], winners], axis=1)
        if lex is not None:
            won = np.take_along_axis(group_lex, best, axis=1).reshape(Q, n_groups * k)
            lex = np.concatenate([lex[:, n_groups * G:], won], axis=1)
    logits = _score_groups(score_fn, q, corpus, survivors, lex)         # [Q, n <= G]
    passes += (survivors >= 0).any(1)
    order = _best_first(logits, survivors, losers)[:, :k]
    indices = np.take_along_axis(survivors, order, axis=1)
    scores = np.take_along_axis(logits, order, axis=1)
    return indices, scores.astype(np.float32), passes


def _best_first(logits: np.ndarray, groups: np.ndarray, losers: np.ndarray | None) -> np.ndarray:
    """Column order of each row of logits [B, N], highest first; equal logits keep their order, except that
    the row's loser (a corpus index in groups [B, N]) goes after all the others with its logit."""
    if losers is None:
        return np.argsort(-logits, axis=1, kind="stable")
    return np.lexsort((groups == np.asarray(losers)[:, None], -logits), axis=-1)


def pessimistic_cut(indices: np.ndarray, scores: np.ndarray, losers: np.ndarray, depth: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Ranked lists [Q, n] (best first, -1 = none) with each query's loser moved behind every result with the
    same score, cut to `depth` columns. Pass n = depth + 1 when more results exist, so that a loser tied with
    the first result beyond the cut falls outside it."""
    out_i, out_s = indices[:, :depth].copy(), scores[:, :depth].copy()
    for row, loser in enumerate(np.asarray(losers).tolist()):
        idx, sc = indices[row].tolist(), scores[row].tolist()
        if loser not in idx:
            continue
        j = idx.index(loser)
        t = j
        while t + 1 < len(idx) and idx[t + 1] >= 0 and sc[t + 1] == sc[j]:
            t += 1
        idx.insert(t, idx.pop(j))
        sc.insert(t, sc.pop(j))
        out_i[row], out_s[row] = idx[:depth], sc[:depth]
    return out_i, out_s


def tree_search(score_fn: ScoreFn, query, corpus, k: int, group_size: int,
                bm25: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Tournament of one query [E] over the whole corpus [M, E] (bm25 [M]: the corpus's BM25 scores for it)
    -> (indices [k], scores [k], passes)."""
    corpus = np.asarray(corpus, dtype=np.float32)
    if not 1 <= k <= len(corpus):
        raise MixretError(f"k must be between 1 and the corpus size {len(corpus)}, got {k}")
    indices, scores, passes = tournament(score_fn, np.asarray(query, dtype=np.float32)[None], corpus, k, group_size,
                                         bm25=None if bm25 is None else np.asarray(bm25)[None])
    return indices[0], scores[0], int(passes[0])


def _score_groups(score_fn: ScoreFn, queries: np.ndarray, corpus: np.ndarray, groups: np.ndarray,
                  bm25: np.ndarray | None) -> np.ndarray:
    """score_fn over groups [B, N] of corpus indices (-1 = empty slot), with their BM25 scores [B, N] or None
    -> logits [B, N], -inf at empty slots."""
    mask = groups >= 0
    logits = np.asarray(score_fn(queries, corpus[np.where(mask, groups, 0)], mask, bm25), dtype=np.float32)
    return np.where(mask, logits, -np.inf)


def matcher_score_fn(matcher, batch_size: int = 1024) -> ScoreFn:
    """A ScoreFn running the matcher without gradients, batch_size candidate sets per forward call."""
    device = next(matcher.parameters()).device

    @torch.no_grad()
    def score(queries: np.ndarray, cands: np.ndarray, mask: np.ndarray, bm25: np.ndarray | None) -> np.ndarray:
        was_training = matcher.training
        matcher.eval()
        try:
            out = []
            for i in range(0, len(queries), batch_size):
                m = torch.from_numpy(np.ascontiguousarray(mask[i:i + batch_size])).to(device)
                lex = None if bm25 is None else torch.from_numpy(np.ascontiguousarray(bm25[i:i + batch_size]))
                out.append(matcher(torch.from_numpy(queries[i:i + batch_size]).to(device),
                                   torch.from_numpy(np.ascontiguousarray(cands[i:i + batch_size])).to(device),
                                   None if bool(m.all()) else m, lex).float().cpu())
        finally:
            matcher.train(was_training)
        return torch.cat(out).numpy()
    return score


# -- retriever --------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """Ranked corpus rows per query: indices [Q, k] int64 (-1 = none), scores [Q, k] float32,
    passes [Q] int64 matcher forward passes (0 for vector and bm25), seconds spent searching."""
    indices: np.ndarray
    scores: np.ndarray
    passes: np.ndarray
    seconds: float = 0.0


class Retriever:
    """A corpus searchable in every mode: texts and their embeddings [M, E] (None for bm25 only), plus
    whatever each mode needs (a VectorIndex, built as Flat on first use when not given; a matcher for
    tree and hybrid; a Fusion for fusion) and how BM25 scores (a mixret.bm25.BM25Params; default: k1 1.5,
    b 0.75, stemmed). A matcher's bm25 feature keeps the default BM25 it was trained with."""

    def __init__(self, embeddings, texts: Sequence[str], index: VectorIndex | None = None,
                 matcher=None, fusion=None, bm25_params=None, query_chunk_bytes: int = 1 << 28):
        self.texts = list(texts)
        self.embeddings = None if embeddings is None else _as_matrix(embeddings, "corpus embeddings")
        if not self.texts:
            raise MixretError("the corpus is empty")
        if self.embeddings is None:
            if index is not None or matcher is not None:
                raise MixretError("a vector index or a matcher needs the corpus embeddings")
        elif len(self.texts) != len(self.embeddings):
            raise MixretError(f"the corpus has {len(self.embeddings)} embeddings but {len(self.texts)} texts")
        if index is not None and (index.count, index.dim) != self.embeddings.shape:
            raise MixretError(f"the index holds {index.count} vectors of dim {index.dim}, the corpus "
                              f"{self.embeddings.shape[0]} of dim {self.embeddings.shape[1]}")
        if matcher is not None and matcher.config.emb_dim != self.embeddings.shape[1]:
            raise MixretError(f"the matcher takes {matcher.config.emb_dim}-dim embeddings but the corpus has "
                              f"{self.embeddings.shape[1]}-dim ones: it was trained on another model's embeddings")
        self._index = index
        self._bm25: BM25Index | None = None
        self._default_bm25: BM25Index | None = None
        self.bm25_params = bm25_params   # None: the defaults
        self.matcher = matcher
        self.fusion = fusion        # a mixret.fusion.Fusion: the weight of fusion mode
        self.query_chunk_bytes = query_chunk_bytes  # bound on the candidate embeddings gathered at once

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def index(self) -> VectorIndex:
        if self._index is None:
            self._index = VectorIndex.build(self.embeddings)
        return self._index

    @property
    def bm25(self) -> BM25Index:
        """The BM25 of the bm25 and fusion modes and of a bm25 shortlist, with bm25_params."""
        if self._bm25 is None:
            self._bm25 = BM25Index(self.texts) if self.bm25_params is None else self.bm25_params.index(self.texts)
        return self._bm25

    @property
    def matcher_bm25(self) -> BM25Index:
        """The BM25 of a matcher's bm25 feature: the default one, as in its training."""
        if self.bm25_params is None or self.bm25_params.is_default:
            return self.bm25
        if self._default_bm25 is None:
            self._default_bm25 = BM25Index(self.texts)
        return self._default_bm25

    @property
    def group_size(self) -> int:
        return self.matcher.config.context - 1

    def search(self, mode: str, k: int, query_emb=None, queries: Sequence[str] | None = None,
               shortlist: int = 256, shortlist_from: str = "vector", losers=None) -> SearchResult:
        """Top k per query. vector and tree need query_emb [Q, E]; bm25 needs the query texts; fusion both;
        hybrid needs query_emb and, with shortlist_from="bm25", the texts as well. losers [Q]: a corpus
        row per query that loses every tie (evaluation passes each query's relevant document; see the
        module docstring)."""
        import time
        if mode not in MODES:
            raise MixretError(f"unknown search mode {mode!r}; expected one of {', '.join(MODES)}")
        if not 1 <= k <= len(self):
            raise MixretError(f"k={k} but the corpus has {len(self)} texts; k must be between 1 and {len(self)}")
        if mode in ("tree", "hybrid") and self.matcher is None:
            raise MixretError(f"{mode} search needs a matcher (--matcher DIR)")
        if mode == "fusion" and self.fusion is None:
            raise MixretError("fusion search needs a fusion weight: fine-tune the model with `mixret finetune` "
                              "(it fits one) or pass --fusion-weight")
        if losers is not None:
            losers = np.asarray(losers, dtype=np.int64)
        start = time.perf_counter()
        if mode in ("bm25", "vector", "fusion"):
            depth = k if losers is None else min(k + 1, len(self))  # one more, to see a tie at the cut
            if mode == "bm25":
                scores, indices = self.bm25.search(self._texts(queries), depth)
            elif mode == "vector":
                scores, indices = self.index.search(self._query_emb(query_emb), depth)
            else:
                scores, indices = self._fusion(self._query_emb(query_emb), self._texts(queries), depth)
            if losers is not None:
                indices, scores = pessimistic_cut(indices, scores, losers, k)
            passes = np.zeros(len(indices), dtype=np.int64)
        elif mode == "tree":
            q = self._query_emb(query_emb)
            check_tournament(len(self), k, self.group_size)
            indices, scores, passes = self._tournament(q, None, k, queries, losers)
        else:
            q = self._query_emb(query_emb)
            if shortlist_from not in SHORTLIST_SOURCES:
                raise MixretError(f"unknown shortlist source {shortlist_from!r}; expected vector or bm25")
            size = min(shortlist, len(self))
            if size < k:
                raise MixretError(f"the shortlist ({shortlist}) must hold at least k={k} candidates")
            check_tournament(size, k, self.group_size)
            depth = size if losers is None else min(size + 1, len(self))
            if shortlist_from == "vector":
                cand_scores, cands = self.index.search(q, depth)
            else:
                cand_scores, cands = self.bm25.search(self._texts(queries), depth)
            if losers is not None:
                cands, _ = pessimistic_cut(cands, cand_scores, losers, size)
            indices, scores, passes = self._tournament(q, cands, k, queries, losers)
        return SearchResult(indices, scores, passes, time.perf_counter() - start)

    def fusion_candidates(self, q: np.ndarray, texts: list[str], depth: int):
        """The union of the dense and BM25 top `depth` per query, with both exact scores
        -> (cands [Q, N] corpus rows, -1 = none; dense [Q, N]; bm25 [Q, N])."""
        from mixret.fusion import candidate_union
        depth = min(depth, len(self))
        _, dense_top = self.index.search(q, depth)
        _, bm25_top = self.bm25.search(texts, depth)
        cands = candidate_union(dense_top, bm25_top)
        return cands, self.index.similarity(q, self.embeddings, cands), self.bm25.scores_of(texts, cands)

    def _fusion(self, q: np.ndarray, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, indices [Q, k]) of fusion search, best first."""
        from mixret.fusion import fused_order
        f = self.fusion
        cands, dense, lexical = self.fusion_candidates(q, texts, max(f.depth, k))
        order, fused = fused_order(dense, lexical, cands, f.weight, f.method)
        return fused[:, :k].astype(np.float32), np.take_along_axis(cands, order, axis=1)[:, :k]

    def _tournament(self, q: np.ndarray, cands: np.ndarray | None, k: int, queries: Sequence[str] | None,
                    losers: np.ndarray | None = None):
        """The tournament in chunks of queries, so that the gathered candidates stay within budget; a matcher
        with the bm25 feature gets each candidate's BM25 score for the query text."""
        score_fn = matcher_score_fn(self.matcher)
        texts = self._texts(queries) if self.matcher.config.needs_bm25 else None
        n = len(self) if cands is None else cands.shape[1]
        chunk = max(1, self.query_chunk_bytes // (4 * n * self.embeddings.shape[1]))

        def bm25(i: int) -> np.ndarray | None:   # [chunk, n] scores of the chunk's candidates, or None
            if texts is None:
                return None
            rows = cands[i:i + chunk] if cands is not None else np.broadcast_to(np.arange(n), (len(q[i:i + chunk]), n))
            return self.matcher_bm25.scores_of(texts[i:i + chunk], rows)

        parts = [tournament(score_fn, q[i:i + chunk], self.embeddings, k, self.group_size,
                            None if cands is None else cands[i:i + chunk], bm25(i),
                            None if losers is None else losers[i:i + chunk])
                 for i in range(0, max(len(q), 1), chunk)]  # no queries: one empty call
        return tuple(np.concatenate(p) for p in zip(*parts))

    def _query_emb(self, query_emb) -> np.ndarray:
        if query_emb is None or self.embeddings is None:
            raise MixretError("this search mode needs the query and corpus embeddings")
        q = _as_matrix(query_emb, "query embeddings")
        if q.shape[1] != self.embeddings.shape[1]:
            raise MixretError(f"query embeddings have dim {q.shape[1]} but the corpus embeddings have dim "
                              f"{self.embeddings.shape[1]} (embed queries with the model that embedded the corpus)")
        return q

    def _texts(self, queries) -> list[str]:
        if queries is None:
            raise MixretError("bm25 search, and a matcher with the bm25 feature, need the query texts")
        return list(queries)


# -- loading what a search needs --------------------------------------------------------------

@dataclass
class LoadedCorpus:
    """An EMB_DIR loaded for searching: ids and texts, the Retriever, and the query encoder (None when only
    bm25 was asked for)."""
    ids: list[str]
    texts: list[str]
    retriever: Retriever
    model: object | None
    model_dir: str | None
    spec: object           # mixret.embed.EmbeddingSpec of the corpus embeddings
    snapshot: object = None  # the mixret.corpus.Snapshot searched (the folder with its write-ahead log applied)

    def close(self) -> None:
        """Let go of the vector index's outside resources (a Milvus Lite file, which one process opens at a time)."""
        if self.retriever._index is not None:
            self.retriever._index.close()

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        """Queries embedded exactly as the corpus was: same model, pooling and number of tokens kept."""
        return self.model.encode(list(queries), batch_size=max(len(queries), 1), pooling=self.spec.pooling or "last",
                                 max_length=self.spec.max_length, show_progress_bar=False)


def load_corpus(emb_dir: str | os.PathLike, modes: Sequence[str], model_dir=None, matcher_dir=None,
                fusion_weight: float | None = None, shortlist_from: str = "vector") -> LoadedCorpus:
    """What searching EMB_DIR in `modes` needs, each part checked against the corpus embeddings: the model
    (default: the one named in meta.json), the FAISS index, the matcher, the fusion weight (default: the
    model's fusion.json) and BM25's parameters (EMB_DIR/bm25.json, copied there by `mixret index`; defaults
    without it). Parts no mode uses are not loaded; tree and hybrid without a matcher are refused when they
    are the only modes asked for."""
    from mixret.bm25 import emb_dir_bm25
    from mixret.corpus import load_snapshot
    from mixret.embed import EmbeddingSpec, load_emb_dir
    from mixret.fusion import load_fusion

    loaded = load_emb_dir(emb_dir)
    meta = loaded[3]
    bm25_params = emb_dir_bm25(emb_dir, meta)
    spec, what = EmbeddingSpec.of(meta), f"the corpus embeddings in {emb_dir}"
    model = matcher = fusion = None
    with_index = False
    if any(m != "bm25" for m in modes):
        model_dir = model_dir or meta.get("model_path")
        if model_dir is None:
            raise MixretError(f"{emb_dir}: meta.json names no model; pass --model DIR")
        model, _ = load_model_checked(model_dir, meta, emb_dir)
        with_index = bool({"vector", "fusion"} & set(modes) or ("hybrid" in modes and shortlist_from == "vector"))
    snap, _ = load_snapshot(emb_dir, with_index, loaded)
    emb, ids, texts, index = snap.emb, snap.ids, snap.texts, snap.index
    if any(m != "bm25" for m in modes):
        matcher_modes = [m for m in modes if m in ("tree", "hybrid")]
        if matcher_dir is not None and matcher_modes:
            matcher = load_matcher_checked(matcher_dir, spec, what)
        elif matcher_modes and len(matcher_modes) == len(modes):
            raise MixretError(f"{' and '.join(matcher_modes)} search ranks with a matcher: pass --matcher DIR")
        if "fusion" in modes:
            fusion = load_fusion(model_dir, fusion_weight)
    retriever = Retriever(emb if model is not None else None, texts, index=index, matcher=matcher, fusion=fusion,
                          bm25_params=bm25_params)
    return LoadedCorpus(ids, texts, retriever, model, None if model is None else str(model_dir), spec, snap)


def load_model_checked(model_dir: str | os.PathLike, emb_meta: dict | None = None, emb_dir=None):
    """Load the language model in model_dir -> (model, weights hash); refuse it when emb_meta (the
    meta.json of the EMB_DIR it will be searched against) names another model or dim."""
    from mixret.embed import EmbeddingSpec
    from mixret.models import load
    model = load(model_dir)
    model_hash = io.file_hash(Path(model_dir) / io.WEIGHTS_NAME)
    if emb_meta is not None:
        meta_path = Path(emb_dir) / "meta.json" if emb_dir is not None else "the embeddings"
        EmbeddingSpec.of(emb_meta).check(EmbeddingSpec(model_hash, None, None),
                                         f"the corpus embeddings ({meta_path}, made by "
                                         f"{emb_meta.get('model_path', 'a model of unknown path')})",
                                         f"the query encoder {model_dir}")
        dim = emb_meta.get("dim")
        if dim is not None and dim != model.config.d_model:
            raise MixretError(f"{meta_path}: the corpus embeddings have dim {dim} but {model_dir} gives "
                              f"{model.config.d_model}-dim embeddings")
    return model, model_hash


def load_matcher_checked(matcher_dir: str | os.PathLike, spec=None, what: str = "the corpus embeddings"):
    """Load a matcher; refuse it when the embeddings it was trained on differ from `spec` (a
    mixret.embed.EmbeddingSpec, described as `what`) in model, pooling or max_length."""
    from mixret.matcher import Matcher
    matcher = Matcher.from_pretrained(matcher_dir)
    if spec is not None:
        spec.check(matcher_spec(matcher), what, f"the matcher {matcher_dir}")
    return matcher


def matcher_spec(matcher):
    """The EmbeddingSpec of the embeddings a matcher was trained on."""
    from mixret.embed import EmbeddingSpec
    return EmbeddingSpec.of(matcher.config.to_dict())


def format_hits(ids: Sequence[str], texts: Sequence[str], indices: np.ndarray, scores: np.ndarray,
                width: int = 80) -> str:
    """One query's results [k] as an aligned table: rank, id, score and the text's first `width` characters."""
    rows = [(r, ids[i], s, " ".join(texts[i].split())) for r, (i, s) in enumerate(zip(indices, scores), 1) if i >= 0]
    id_width = max([2] + [len(row[1]) for row in rows])
    lines = [f"{'rank':>4}  {'id':<{id_width}}  {'score':>9}  text"]
    for r, doc_id, s, text in rows:
        snippet = text if len(text) <= width else text[:width - 3] + "..."
        lines.append(f"{r:>4}  {doc_id:<{id_width}}  {s:>9.4f}  {snippet}")
    return "\n".join(lines)
