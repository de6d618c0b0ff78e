"""TF-IDF: a second lexical baseline, the one most users know: scikit-learn's TfidfVectorizer, ranked by cosine.

Words. A text is lowercased and cut into words of two or more letters or digits (scikit-learn's default token
pattern); scikit-learn's English stop words are dropped and, with the stemmer on (the default), every other word is
reduced to its Snowball English stem by PyStemmer, the stemmer mixret's BM25 uses, so "queues" matches "queueing"
(`Analyzer`).

Weights. A word's weight in a text is (1 + ln tf) * idf, tf its count in the text and idf = ln((1 + n) / (1 + df)) + 1
for a corpus of n texts, df of them holding it (TfidfVectorizer with sublinear_tf=True and its default smooth_idf);
each text's vector is scaled to unit length. A query is weighted the same way with the corpus's idf (words no
corpus text holds are ignored), and its score against a text is the dot product of the two unit vectors, their
cosine: between 0 and 1, and 0 against every text when they share no word. Nothing is fitted.

The vectors are exactly those of TfidfVectorizer(analyzer=Analyzer(), sublinear_tf=True), held in its two parts,
CountVectorizer's term counts then TfidfTransformer, so that an index built with keep_terms follows a changing
corpus (`mixret serve`'s writes) from the counts it keeps, tokenising only the new texts, and gives the scores of an
index built afresh from the corpus of that moment.

Equal scores are ranked by corpus index (lower first), as in bm25 mode; an evaluation puts the relevant document
after every document scoring the same as it (mixret.retrieval.search: `losers`).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from mixret.errors import MixretError
from mixret.retrieval.bm25 import candidate_scores, top_k

WORD = re.compile(r"(?u)\b\w\w+\b")     # scikit-learn's default token_pattern
SCORE_CHUNK = 1 << 24                    # query x text scores computed at once (float64: 128 MiB)


class Analyzer:
    """A text -> its words: lowercased, split by scikit-learn's token pattern, its English stop words dropped and,
    with stemmer on, each word stemmed by the Snowball English stemmer (PyStemmer). Each instance has its own
    stemmer (PyStemmer's are not to be shared between threads)."""

    def __init__(self, stemmer: bool = True):
        import Stemmer
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
        self.stemmer = Stemmer.Stemmer("english") if stemmer else None
        self.stop_words = ENGLISH_STOP_WORDS

    def __call__(self, text: str) -> list[str]:
        words = [w for w in WORD.findall(text.lower()) if w not in self.stop_words]
        return self.stemmer.stemWords(words) if self.stemmer is not None else words


def count_terms(analyzer: Analyzer, texts: Sequence[str]):
    """CountVectorizer's term counts of texts -> (CSR int64 [n, V], sorted indices; the V terms in column order,
    sorted). Texts without a single word give V = 0."""
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import CountVectorizer
    vectorizer = CountVectorizer(analyzer=analyzer)
    try:
        counts = vectorizer.fit_transform(list(texts))
    except ValueError as e:
        if "empty vocabulary" not in str(e):
            raise
        return sp.csr_matrix((len(texts), 0), dtype=np.int64), []
    counts = sp.csr_matrix(counts, dtype=np.int64)
    counts.sort_indices()
    return counts, list(vectorizer.get_feature_names_out())


class TfidfIndex:
    """TF-IDF cosine search over texts (see the module docstring): `search(queries, k)` as BM25Index's.

    keep_terms: keep the texts' term counts (memory of the order of the corpus's distinct (text, term) pairs), so
    that `updated` follows writes without tokenising the corpus again."""

    def __init__(self, texts: Sequence[str], stemmer: bool = True, keep_terms: bool = False):
        if len(texts) == 0:
            raise MixretError("cannot build a TF-IDF index over an empty corpus")
        self.stemmer, self.keep_terms = stemmer, keep_terms
        self.analyzer = Analyzer(stemmer)
        self._fit(*count_terms(self.analyzer, texts))

    def _fit(self, counts, terms: list[str]) -> None:
        """IDF from the term counts [n, V] (columns: terms), and the texts' unit TF-IDF vectors."""
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import TfidfTransformer
        self.count, self.terms = counts.shape[0], terms
        self.vocabulary = {t: j for j, t in enumerate(terms)}
        self.counts = counts if self.keep_terms else None
        if terms:
            self.transformer = TfidfTransformer(sublinear_tf=True).fit(counts)
            self.matrix = sp.csr_matrix(self.transformer.transform(counts))      # [n, V] float64, unit rows
        else:
            self.transformer, self.matrix = None, sp.csr_matrix((self.count, 0), dtype=np.float64)

    def updated(self, keep: np.ndarray, texts: Sequence[str], added: np.ndarray) -> "TfidfIndex":
        """The TF-IDF of the corpus after an update (see VectorIndex.updated for keep and added; texts: the new
        corpus's), built from the kept term counts: only the added texts are tokenised. Needs keep_terms."""
        import scipy.sparse as sp
        if self.counts is None:
            raise MixretError("this TF-IDF index was built without keep_terms; it cannot follow writes")
        new = TfidfIndex.__new__(TfidfIndex)
        new.stemmer, new.keep_terms = self.stemmer, True
        new.analyzer = Analyzer(self.stemmer)          # its own stemmer: this index may be searching meanwhile
        keep = np.asarray(keep, dtype=np.int64)
        added = np.asarray(added, dtype=np.int64)
        old_rows = np.flatnonzero(keep >= 0)
        kept = self.counts[old_rows].tocoo()                                       # rows: of old_rows
        add_counts, add_terms = count_terms(new.analyzer, [texts[r] for r in added.tolist()])
        add = add_counts.tocoo()                                                   # rows: of added
        old_terms = np.array(self.terms, dtype=object)
        used = np.unique(kept.col)                                                 # old terms still in the corpus
        terms = sorted(set(old_terms[used].tolist()) | set(add_terms))
        column = {t: j for j, t in enumerate(terms)}
        old_to_new = np.full(len(old_terms), -1, dtype=np.int64)
        old_to_new[used] = [column[t] for t in old_terms[used].tolist()]
        add_to_new = np.array([column[t] for t in add_terms], dtype=np.int64)
        covered = np.zeros(len(texts), dtype=bool)
        covered[keep[old_rows]] = True
        covered[added] = True
        if len(keep[old_rows]) + len(added) != len(texts) or not covered.all():
            raise MixretError("TF-IDF update: a row of the new corpus is neither kept nor added, or both")
        rows = np.concatenate([keep[old_rows][kept.row], added[add.row]])
        cols = np.concatenate([old_to_new[kept.col], add_to_new[add.col]])
        data = np.concatenate([kept.data, add.data])
        counts = sp.csr_matrix((data.astype(np.int64), (rows, cols)), shape=(len(texts), len(terms)), dtype=np.int64)
        counts.sort_indices()
        new._fit(counts, terms)
        return new

    def vectors(self, queries: Sequence[str]):
        """The queries' unit TF-IDF vectors [Q, V] (CSR float64; all zero for a query sharing no word with the
        corpus), as TfidfVectorizer.transform gives them."""
        import scipy.sparse as sp
        rows, cols = [], []
        for i, query in enumerate(queries):
            for word in self.analyzer(query):
                j = self.vocabulary.get(word)
                if j is not None:
                    rows.append(i)
                    cols.append(j)
        counts = sp.csr_matrix((np.ones(len(rows), dtype=np.int64), (rows, cols)),
                               shape=(len(queries), len(self.terms)), dtype=np.int64)
        counts.sort_indices()
        if self.transformer is None:
            return counts.astype(np.float64)
        return sp.csr_matrix(self.transformer.transform(counts))

    def score_matrix(self, queries: Sequence[str]) -> np.ndarray:
        """Cosine of every query with every corpus text -> [Q, M] float32."""
        if not len(queries):
            return np.zeros((0, self.count), dtype=np.float32)
        return np.asarray((self.matrix @ self.vectors(queries).T).T.todense(), dtype=np.float32)

    def scores(self, query: str) -> np.ndarray:
        """TF-IDF cosine of every corpus text with one query -> [M] float32 (0 when they share no word)."""
        return self.score_matrix([query])[0]

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries -> (scores [Q, k] float32, indices [Q, k] int64), best first, equal scores by corpus index."""
        if not 1 <= k <= self.count:
            raise MixretError(f"k must be between 1 and the corpus size {self.count}, got {k}")
        queries = list(queries)
        out_scores = np.zeros((len(queries), k), dtype=np.float32)
        out_indices = np.zeros((len(queries), k), dtype=np.int64)
        chunk = max(1, SCORE_CHUNK // self.count)
        for start in range(0, len(queries), chunk):
            block = self.score_matrix(queries[start:start + chunk])                # [chunk, M]
            for i, s in enumerate(block, start):
                order = top_k(s, k)
                out_scores[i], out_indices[i] = s[order], order
        return out_scores, out_indices

    def scores_of(self, queries: Sequence[str], cands: np.ndarray) -> np.ndarray:
        """TF-IDF scores [Q, N] of corpus rows cands [Q, N] (-1 = none: 0)."""
        return candidate_scores(self.scores, queries, cands)
