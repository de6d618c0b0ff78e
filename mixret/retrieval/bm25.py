"""BM25's parameters: k1, b and the stemmer, fitted on validation pairs and saved as bm25.json.

`mixret finetune` fits them on its validation slice (the pairs the fusion weight is fitted on; never training
nor test pairs) over a small grid, and saves them as bm25.json next to fusion.json in the model folder.
`mixret index` copies that file into the EMB_DIR, with the model it came from, so `search --mode bm25` needs no
model; search, serve (from the EMB_DIR) and evaluate (from the model folder) build their BM25 with them. A model
folder or an EMB_DIR without bm25.json (from before the fit existed, or a model that was never fine-tuned) gets
the defaults, which are BM25 exactly as it was before: bm25s's k1 1.5 and b 0.75, words stemmed.

The grid's best is the one with the highest validation R@1, then MRR@10 (the relevant document ranked after
every document scoring the same as it); the defaults win every tie they are in.

bm25.json: {"k1": 0.9, "b": 0.5, "stemmer": true, "fitted": {"on", "pairs", "selected_by", "results": [{"k1",
"b", "stemmer", "r@1", "mrr@10"}, ...]}, "trained_on": [the pairs file's record, as a model's config holds it],
"model": null, or in an EMB_DIR {"path", "hash"} of the model folder it was copied from}.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mixret import io
from mixret.errors import MixretError
from mixret.retrieval.fusion import mrr_at

BM25_NAME = "bm25.json"
BM25_K1, BM25_B = 1.5, 0.75    # bm25s's own defaults: BM25 when nothing was fitted (then fit_bm25 below)
GRID_K1 = (0.6, 0.9, 1.2, 1.5, 2.0)
GRID_B = (0.3, 0.5, 0.75, 0.9)
GRID_STEMMER = (True, False)
SELECTED_BY = ("validation R@1, then MRR@10; ties to the defaults (k1 1.5, b 0.75, stemmer on), else to the first "
               "of the grid (stemmer on, then the smallest k1, then the smallest b)")


@dataclass
class BM25Params:
    """How BM25 scores: k1, b and whether words are stemmed; with the record of their fit when fitted."""
    k1: float = BM25_K1
    b: float = BM25_B
    stemmer: bool = True
    fitted: dict = field(default_factory=dict)     # the pairs, the rule and every grid point's scores
    trained_on: list | None = None                 # the pairs file the validation pairs came from (sources_record)
    model: dict | None = None                      # in an EMB_DIR: {"path", "hash"} of the model it came from

    def __post_init__(self):
        if isinstance(self.k1, bool) or not isinstance(self.k1, (int, float)) or not self.k1 >= 0:
            raise MixretError(f"BM25 k1 must be a number >= 0, got {self.k1!r}")
        if isinstance(self.b, bool) or not isinstance(self.b, (int, float)) or not 0 <= self.b <= 1:
            raise MixretError(f"BM25 b must be a number between 0 and 1, got {self.b!r}")
        if not isinstance(self.stemmer, bool):
            raise MixretError(f"BM25 stemmer must be true or false, got {self.stemmer!r}")

    @property
    def values(self) -> tuple[float, float, bool]:
        return float(self.k1), float(self.b), self.stemmer

    @property
    def is_default(self) -> bool:
        return self.values == BM25Params().values

    def index(self, texts: Sequence[str], keep_terms: bool = False) -> BM25Index:
        return BM25Index(texts, k1=self.k1, b=self.b, stemmer=self.stemmer, keep_terms=keep_terms)

    def describe(self) -> str:
        """"k1 0.9, b 0.5, stemmer on", with "(defaults)" or "(fitted on ...)"."""
        how = "defaults" if not self.fitted else f"fitted on {self.fitted.get('on', 'validation pairs')}"
        return f"k1 {self.k1:g}, b {self.b:g}, stemmer {'on' if self.stemmer else 'off'} ({how})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "BM25 parameters") -> "BM25Params":
        if not isinstance(d, dict):
            raise MixretError(f"{source}: expected a JSON object with k1, b and stemmer, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MixretError(f"{source}: unknown BM25 option(s) {unknown}; expected {sorted(known)}")
        missing = sorted({"k1", "b", "stemmer"} - set(d))
        if missing:
            raise MixretError(f"{source}: BM25 parameters lack {', '.join(missing)}")
        try:
            return cls(**d)
        except MixretError as e:
            raise MixretError(f"{source}: {e}") from None


# -- the fit ----------------------------------------------------------------------------------

def gold_ranks(index: BM25Index, queries: Sequence[str]) -> np.ndarray:
    """1-based rank [Q] of document i for query i, after every document scoring the same as it."""
    ranks = np.empty(len(queries))
    for i, tokens in enumerate(index.tokenize(queries)):
        s = index.token_scores(tokens)                                          # [M]
        ranks[i] = (s >= s[i]).sum()
    return ranks


def fit_bm25(queries: Sequence[str], documents: Sequence[str], on: str, trained_on: list | None = None,
             k1s: Sequence[float] = GRID_K1, bs: Sequence[float] = GRID_B,
             stemmers: Sequence[bool] = GRID_STEMMER) -> BM25Params:
    """The grid point (k1 x b x stemmer) with the best R@1, then MRR@10, of query i against documents (document
    i is its relevant one), as `best_point` picks it. `on` says which pairs these are, for the record."""
    if len(queries) != len(documents) or len(queries) < 2:
        raise MixretError(f"fitting BM25 needs at least 2 validation pairs, got {len(queries)} queries and "
                          f"{len(documents)} documents")
    results = []
    for stemmer in stemmers:
        for k1 in k1s:
            for b in bs:
                ranks = gold_ranks(BM25Index(documents, k1, b, stemmer), queries)      # [Q]
                results.append({"k1": float(k1), "b": float(b), "stemmer": bool(stemmer),
                                "r@1": round(float((ranks == 1).mean()), 5), "mrr@10": round(mrr_at(ranks, 10), 5)})
    best = best_point(results)
    return BM25Params(best["k1"], best["b"], best["stemmer"], trained_on=trained_on,
                      fitted={"on": on, "pairs": len(queries), "selected_by": SELECTED_BY, "results": results})


def best_point(results: list[dict]) -> dict:
    """The result ({"k1", "b", "stemmer", "r@1", "mrr@10"}, as rounded in the record) with the highest R@1, then
    MRR@10; on a tie the defaults, else the first of the list."""
    default = BM25Params().values
    in_order = sorted(results, key=lambda r: (r["k1"], r["b"], r["stemmer"]) != default)   # the defaults first
    return max(in_order, key=lambda r: (r["r@1"], r["mrr@10"]))                              # the first of the best


# -- where they live --------------------------------------------------------------------------

def load_bm25(directory: str | os.PathLike | None) -> BM25Params | None:
    """The BM25 parameters in directory/bm25.json (a model folder or an EMB_DIR); None without the file."""
    if directory is None:
        return None
    path = Path(directory) / BM25_NAME
    if not path.is_file():
        return None
    return BM25Params.from_dict(io.read_json(path, "BM25 parameters"), str(path))


def save_bm25(directory: str | os.PathLike, params: BM25Params) -> None:
    io.write_json(Path(directory) / BM25_NAME, params.to_dict())


def model_bm25(model_dir: str | os.PathLike | None) -> tuple[BM25Params, str]:
    """The BM25 parameters saved with a model (defaults without them) -> (params, a sentence saying which)."""
    params = load_bm25(model_dir)
    if params is not None:
        return params, f"BM25 {params.describe()}, from {Path(model_dir) / BM25_NAME}"
    why = f"{model_dir} has no {BM25_NAME}" if model_dir is not None else "no model folder given"
    return BM25Params(), f"BM25 {BM25Params().describe()}: {why}"


def emb_dir_bm25(emb_dir: str | os.PathLike, meta: dict) -> BM25Params:
    """The BM25 parameters `mixret index` copied into an EMB_DIR (defaults without them); refused when they came
    from another model than the one that made the embeddings (meta: the EMB_DIR's meta.json)."""
    params = load_bm25(emb_dir)
    if params is None:
        return BM25Params()
    made_by, copied_from = meta.get("model_hash"), (params.model or {}).get("hash")
    if made_by is not None and copied_from != made_by:
        origin = (f"came from a model of weights hash {copied_from}" if copied_from is not None
                  else "name no model they came from")
        raise MixretError(f"{Path(emb_dir) / BM25_NAME}: these BM25 parameters {origin}, the embeddings from one of "
                          f"hash {made_by}; expected those of the model that made the embeddings (copy them with "
                          f"`mixret index {emb_dir}`)")
    return params


def copy_to_emb_dir(emb_dir: str | os.PathLike, meta: dict) -> BM25Params:
    """Put the BM25 parameters of the model that made an EMB_DIR's embeddings (meta.json's model_path) into it
    -> the parameters its searches will use. A model without them leaves the defaults (an earlier copy is
    removed); a model folder that is gone, or holds other weights than those that made the embeddings, too,
    with a warning."""
    import warnings
    target = Path(emb_dir) / BM25_NAME
    model_dir = meta.get("model_path")
    params = None
    if model_dir is not None and (Path(model_dir) / io.WEIGHTS_NAME).is_file():
        weights_hash = io.file_hash(Path(model_dir) / io.WEIGHTS_NAME)
        if weights_hash == meta.get("model_hash"):
            params = load_bm25(model_dir)
        else:
            warnings.warn(f"{model_dir} holds other weights than those that made the embeddings in {emb_dir}: "
                          f"its {BM25_NAME} is not used; BM25 keeps its defaults", stacklevel=2)
    elif model_dir is not None:
        warnings.warn(f"{model_dir}: the model that made the embeddings in {emb_dir} is not there; BM25 keeps its "
                      f"defaults", stacklevel=2)
    if params is None:
        target.unlink(missing_ok=True)
        return BM25Params()
    params.model = {"path": str(model_dir), "hash": meta.get("model_hash")}
    save_bm25(emb_dir, params)
    return params




def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The rows of the k best scores [M], best first, equal scores by corpus index (a lexical index's order)."""
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    cut = scores[top].min()                                   # every text scoring above the cut is in top
    tied = np.flatnonzero(scores >= cut)                      # plus all texts tied at the cut
    return tied[np.lexsort((tied, -scores[tied]))][:k]


def candidate_scores(scores, queries: Sequence[str], cands: np.ndarray) -> np.ndarray:
    """scores(query) [M] of corpus rows cands [Q, N] for each query -> [Q, N] (-1 = none: 0)."""
    out = np.zeros(cands.shape, dtype=np.float32)
    for i, (q, c) in enumerate(zip(queries, cands)):
        out[i] = np.where(c >= 0, scores(q)[np.where(c >= 0, c, 0)], 0.0)
    return out


class BM25Index:
    """BM25 (bm25s, Lucene variant) over texts tokenised with bm25s.tokenize, English stopwords removed and, with
    the stemmer on, every word reduced to its stem by the Snowball English stemmer (PyStemmer), so "queues"
    matches "queueing". k1 (term frequency saturation) and b (length normalisation) default to bm25s's own;
    mixret.retrieval.bm25 fits all three on validation pairs."""

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
            order = top_k(s, k)
            out_scores[i], out_indices[i] = s[order], order
        return out_scores, out_indices

    def scores_of(self, queries: Sequence[str], cands: np.ndarray) -> np.ndarray:
        """BM25 scores [Q, N] of corpus rows cands [Q, N] (-1 = none: 0)."""
        return candidate_scores(self.scores, queries, cands)
