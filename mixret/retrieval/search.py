"""Search a corpus of embeddings six ways: vector (FAISS), fusion, tree (matcher tournament), hybrid, bm25, tfidf.

- vector: FAISS top-k over the corpus embeddings, the index built from a factory string
  ("Flat", "HNSW32", "IVF1024,Flat", "IVF4096,PQ32", ...). With metric "ip" the corpus and the
  queries are L2-normalised first (cosine similarity).
- tree: a knockout tournament over the whole corpus with the matcher, no vector index.
- hybrid: a shortlist from the vector index (or BM25), ranked by the same tournament.
- bm25: BM25 over the corpus texts with bm25s (English stopwords, Snowball stems), a lexical baseline; its k1,
  b and stemmer are the ones fitted with the model when `mixret index` put them in EMB_DIR (see mixret.retrieval.bm25).
- tfidf: scikit-learn's TF-IDF (sublinear tf, English stop words, Snowball stems), texts ranked by cosine with the
  query: a second lexical baseline, with nothing fitted (see mixret.retrieval.tfidf).
- fusion: BM25 and the dense similarity combined over both sides' top candidates (see mixret.retrieval.fusion).

Equal scores are ranked by corpus index (lower first) in bm25 and tfidf modes, as FAISS's Flat index does.

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
tournament sorts each group by score, then the loser last among equal scores; vector, bm25 and tfidf search
fetch one result beyond k (and a hybrid shortlist one beyond its size) and move the loser behind every
result that scores the same (`pessimistic_cut`), so a loser tied with the first result left out is
left out too. With constant scores the loser is therefore never found.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mixret.errors import MixretError
from mixret.models.encode import EmbeddingSpec
from mixret.options import option
from mixret.retrieval.bm25 import BM25Index, emb_dir_bm25
from mixret.retrieval.corpus import load_snapshot
from mixret.retrieval.embeddings import load_emb_dir, load_matcher_checked, load_model_checked
from mixret.retrieval.fusion import candidate_union, fused_order, load_fusion
from mixret.retrieval.index import VectorIndex, _as_matrix
from mixret.retrieval.tfidf import TfidfIndex
from mixret.retrieval.tournament import check_tournament, matcher_score_fn, pessimistic_cut, tournament

MODES = ("vector", "fusion", "tree", "hybrid", "bm25", "tfidf")
LEXICAL_MODES = ("bm25", "tfidf")   # the modes that search the texts alone: no model, no embeddings
SHORTLIST_SOURCES = ("vector", "bm25")
EMBEDDING_MODES = ("vector", "fusion", "tree", "hybrid")   # modes that embed the query with the model



# -- vector index -----------------------------------------------------------------------------

















# -- BM25 -------------------------------------------------------------------------------------



# -- tournament -------------------------------------------------------------------------------

















# -- retriever --------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """Ranked corpus rows per query: indices [Q, k] int64 (-1 = none), scores [Q, k] float32,
    passes [Q] int64 matcher forward passes (0 for vector, bm25 and tfidf), seconds spent searching."""
    indices: np.ndarray
    scores: np.ndarray
    passes: np.ndarray
    seconds: float = 0.0


class Retriever:
    """A corpus searchable in every mode: texts and their embeddings [M, E] (None for bm25 and tfidf only), plus
    whatever each mode needs (a VectorIndex, built as Flat on first use when not given; a matcher for
    tree and hybrid; a Fusion for fusion) and how BM25 scores (a mixret.retrieval.bm25.BM25Params; default: k1 1.5,
    b 0.75, stemmed). A matcher's bm25 feature keeps the default BM25 it was trained with. The TF-IDF of tfidf mode
    is built from the texts on first use, like the BM25."""

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
        self._tfidf: TfidfIndex | None = None
        self.bm25_params = bm25_params   # None: the defaults
        self.matcher = matcher
        self.fusion = fusion        # a mixret.retrieval.fusion.Fusion: the weight of fusion mode
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
    def tfidf(self) -> TfidfIndex:
        """The TF-IDF of tfidf mode."""
        if self._tfidf is None:
            self._tfidf = TfidfIndex(self.texts)
        return self._tfidf

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

    def unavailable(self, mode: str) -> str | None:
        """Why this retriever cannot search in `mode` (a sentence), or None when it can."""
        if mode not in MODES:
            return f"unknown search mode {mode!r}; expected one of {', '.join(MODES)}"
        if mode in EMBEDDING_MODES and self.embeddings is None:
            return f"{mode} search needs the query and corpus embeddings"
        if mode in ("tree", "hybrid") and self.matcher is None:
            return f"{mode} search needs a matcher (--matcher DIR)"
        if mode == "fusion" and self.fusion is None:
            return ("fusion search needs a fusion weight: fine-tune the model with `mixret finetune` (it fits one) or "
                    "pass --fusion-weight")
        return None

    def modes(self) -> list[str]:
        """The modes this retriever searches in."""
        return [m for m in MODES if self.unavailable(m) is None]

    def search(self, mode: str, k: int, query_emb=None, queries: Sequence[str] | None = None,
               shortlist: int = 256, shortlist_from: str = "vector", losers=None) -> SearchResult:
        """Top k per query. vector and tree need query_emb [Q, E]; bm25 and tfidf need the query texts; fusion both;
        hybrid needs query_emb and, with shortlist_from="bm25", the texts as well. losers [Q]: a corpus
        row per query that loses every tie (evaluation passes each query's relevant document; see the
        module docstring)."""
        import time
        if mode not in MODES:
            raise MixretError(self.unavailable(mode))
        if not 1 <= k <= len(self):
            raise MixretError(f"k={k} but the corpus has {len(self)} texts; k must be between 1 and {len(self)}")
        why = self.unavailable(mode)
        if why is not None:
            raise MixretError(why)
        if losers is not None:
            losers = np.asarray(losers, dtype=np.int64)
        start = time.perf_counter()
        if mode in ("bm25", "tfidf", "vector", "fusion"):
            depth = k if losers is None else min(k + 1, len(self))  # one more, to see a tie at the cut
            if mode == "bm25":
                scores, indices = self.bm25.search(self._texts(queries), depth)
            elif mode == "tfidf":
                scores, indices = self.tfidf.search(self._texts(queries), depth)
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
        depth = min(depth, len(self))
        _, dense_top = self.index.search(q, depth)
        _, bm25_top = self.bm25.search(texts, depth)
        cands = candidate_union(dense_top, bm25_top)
        return cands, self.index.similarity(q, self.embeddings, cands), self.bm25.scores_of(texts, cands)

    def _fusion(self, q: np.ndarray, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, indices [Q, k]) of fusion search, best first."""
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
            raise MixretError("bm25 and tfidf search, and a matcher with the bm25 feature, need the query texts")
        return list(queries)


# -- loading what a search needs --------------------------------------------------------------

@dataclass
class LoadedCorpus:
    """An EMB_DIR loaded for searching: ids and texts, the Retriever, and the query encoder (None when only
    bm25 or tfidf was asked for)."""
    ids: list[str]
    texts: list[str]
    retriever: Retriever
    model: object | None
    model_dir: str | None
    spec: object           # mixret.models.encode.EmbeddingSpec of the corpus embeddings
    snapshot: object = None  # the Snapshot searched (mixret.retrieval.corpus: the folder with its log applied)

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
    without it). bm25 and tfidf need no model. Parts no mode uses are not loaded; tree and hybrid without a
    matcher are refused when they are the only modes asked for."""

    loaded = load_emb_dir(emb_dir)
    meta = loaded[3]
    bm25_params = emb_dir_bm25(emb_dir, meta)
    spec, what = EmbeddingSpec.of(meta), f"the corpus embeddings in {emb_dir}"
    model = matcher = fusion = None
    with_index = False
    if any(m not in LEXICAL_MODES for m in modes):
        model_dir = model_dir or meta.get("model_path")
        if model_dir is None:
            raise MixretError(f"{emb_dir}: meta.json names no model; pass --model DIR")
        model = load_model_checked(model_dir, meta, emb_dir)
        with_index = bool({"vector", "fusion"} & set(modes) or ("hybrid" in modes and shortlist_from == "vector"))
    snap, _ = load_snapshot(emb_dir, with_index, loaded)
    emb, ids, texts, index = snap.emb, snap.ids, snap.texts, snap.index
    if any(m not in LEXICAL_MODES for m in modes):
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


@dataclass
class RetrievalConfig:
    """What `search`, `serve` and `evaluate` take to search a corpus: the model, matcher and each mode's knobs."""
    model: str | None = option(None, "Language model folder that embeds the texts (search, serve: the model named in "
                                     "EMB_DIR/meta.json; evaluate: the newest model under ./runs). evaluate also "
                                     "takes BM25's fitted k1, b and stemmer from it (its bm25.json), with --mode bm25 "
                                     "too.")
    matcher: str | None = option(None, "Matcher folder (from `mixret train-matcher`), for tree and hybrid.")
    fusion_weight: float | None = option(None, "fusion: weight of the model's score against BM25's (0: BM25's "
                                               "ranking, 1: the model's).",
                                         show="the weight `mixret finetune` fitted and saved with the model "
                                              "(fusion.json)")
    shortlist: int = option(256, "hybrid: candidates the matcher's tournament ranks.")
    shortlist_from: str = option("vector", "hybrid: where the shortlist comes from.", choices=SHORTLIST_SOURCES)
