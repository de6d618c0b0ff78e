"""Fusion of lexical (BM25) and dense scores into one ranking, and the fitting of its weight.

For each query the candidates are the union of BM25's top `depth` and the dense top `depth`; both scores are
computed exactly for every candidate (BM25 over the whole corpus, the dense score as the cosine of the
embeddings), so a candidate found by one side is never missing the other side's score. Two ways to combine:

- convex (default): per query, each side's scores are min-max normalised over the candidates, then
  fused = w * dense + (1 - w) * bm25;
- rrf: weighted reciprocal rank fusion, fused = w / (60 + rank_dense) + (1 - w) / (60 + rank_bm25), the ranks
  (1 = best) taken among the candidates, equal scores sharing a rank.

Ranking is by the fused score, then by the raw score of the side with the larger weight, then by corpus
index, so weight 0 reproduces BM25's ranking exactly and weight 1 the dense ranking (ties broken by index on
both sides, as the bm25 and vector modes do).

Ties are pessimistic when the weight is fitted, as in evaluation (see mixret.retrieval.evaluate): each
validation query's gold candidate ranks after every candidate with the same fused score, compared as the float32
scores a search returns, so constant scores find no gold.

The weight is fitted on pairs the model was not trained on and that are not test pairs (a validation slice of
the training pairs): the grid value with the best MRR@10, the smallest such weight on a tie.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from mixret import io
from mixret.errors import MixretError

FUSION_METHODS = ("convex", "rrf")
FUSION_NAME = "fusion.json"
RRF_K = 60
GRID = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 21))


@dataclass
class Fusion:
    """How `fusion` mode combines BM25 and dense scores (saved as fusion.json next to a fine-tuned model)."""
    weight: float = 0.5           # weight of the dense side, 0..1
    method: str = "convex"
    depth: int = 100              # candidates taken from each side
    fitted: dict = field(default_factory=dict)   # how the weight was fitted: pairs, grid, MRR@10 per weight

    def __post_init__(self):
        if self.method not in FUSION_METHODS:
            raise MixretError(f"unknown fusion method {self.method!r}; expected one of {', '.join(FUSION_METHODS)}")
        if not 0.0 <= float(self.weight) <= 1.0:
            raise MixretError(f"the fusion weight must be between 0 and 1, got {self.weight}")
        if int(self.depth) < 1:
            raise MixretError(f"the fusion depth must be a positive number of candidates, got {self.depth}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "fusion") -> "Fusion":
        known = {"weight", "method", "depth", "fitted"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MixretError(f"{source}: unknown fusion option(s) {unknown}")
        return cls(**d)


def load_fusion(model_dir, weight: float | None = None) -> Fusion | None:
    """The fusion saved with a fine-tuned model (model_dir/fusion.json), its weight replaced by `weight` when
    given; with no file, a convex fusion of that weight (None when no weight is given either)."""
    from pathlib import Path

    path = Path(model_dir) / FUSION_NAME if model_dir is not None else None
    saved = Fusion.from_dict(io.read_json(path, "fusion weight"), str(path)) if path and path.is_file() else None
    if weight is None:
        return saved
    return Fusion(weight=weight, method=saved.method if saved else "convex", depth=saved.depth if saved else 100,
                  fitted={"given": "--fusion-weight"})


def candidate_union(*index_lists: np.ndarray) -> np.ndarray:
    """Corpus indices [Q, a], [Q, b], ... (-1 = none) -> [Q, n] the distinct indices per query, -1 padded."""
    rows = [np.unique(np.concatenate([ix[q] for ix in index_lists])) for q in range(len(index_lists[0]))]
    rows = [r[r >= 0] for r in rows]
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for q, r in enumerate(rows):
        out[q, :len(r)] = r
    return out


def _minmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-row min-max normalisation over the masked-in entries: [Q, N] -> [Q, N] in [0, 1] (0 where masked out
    or where a row's scores are all equal)."""
    big = np.finfo(np.float64).max
    lo = np.where(mask, scores, big).min(1, keepdims=True)
    hi = np.where(mask, scores, -big).max(1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(mask, (scores - lo) / span, 0.0)


def _ranks(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """1-based rank of each candidate by score among a row's masked-in entries, equal scores sharing the best
    of their ranks (1 + the number of candidates scoring higher), so that a tie on one side stays a tie."""
    keyed = np.where(mask, scores, -np.inf)
    order = np.argsort(-keyed, axis=1, kind="stable")               # best first
    ranked = np.take_along_axis(keyed, order, axis=1)
    position = np.arange(ranked.shape[1])[None]
    starts = np.ones(ranked.shape, dtype=bool)
    starts[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.maximum.accumulate(np.where(starts, position, 0), axis=1) + 1, axis=1)
    return ranks


def fused_scores(dense: np.ndarray, lexical: np.ndarray, cands: np.ndarray, weight: float,
                 method: str = "convex") -> np.ndarray:
    """dense, lexical [Q, N] exact scores of the candidates cands [Q, N] (-1 = none) -> fused [Q, N] float64
    (-inf at empty slots)."""
    mask = cands >= 0
    dense, lexical = dense.astype(np.float64), lexical.astype(np.float64)
    if method == "convex":
        fused = weight * _minmax(dense, mask) + (1.0 - weight) * _minmax(lexical, mask)
    elif method == "rrf":
        fused = weight / (RRF_K + _ranks(dense, mask)) + (1.0 - weight) / (RRF_K + _ranks(lexical, mask))
    else:
        raise MixretError(f"unknown fusion method {method!r}; expected one of {', '.join(FUSION_METHODS)}")
    return np.where(mask, fused, -np.inf)


def fused_order(dense: np.ndarray, lexical: np.ndarray, cands: np.ndarray, weight: float,
                method: str = "convex", losers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank the candidates -> (order [Q, N] positions into cands, best first; fused scores [Q, N] in that order).

    Ties of the fused score go to the raw score of the heavier side, then to the lower corpus index. losers [Q]:
    a corpus index per query that ranks after every candidate whose fused score equals its own in float32 (as
    `pessimistic_cut` treats the float32 scores of a fusion search), whatever their raw scores and indices."""
    fused = fused_scores(dense, lexical, cands, weight, method)
    heavier = dense if weight >= 0.5 else lexical
    tiebreak = np.where(cands >= 0, heavier.astype(np.float64), -np.inf)
    keys = (np.where(cands >= 0, cands, np.iinfo(np.int64).max), -tiebreak, -fused)
    if losers is not None:
        keys += (cands == np.asarray(losers)[:, None], -fused.astype(np.float32))
    order = np.lexsort(keys, axis=1)
    return order, np.take_along_axis(fused, order, axis=1)


def gold_ranks(order: np.ndarray, cands: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based rank of each query's gold corpus index in its ranking (inf when it is not a candidate); pass the
    golds to `fused_order` as losers for ties counted against them."""
    ranked = np.take_along_axis(cands, order, axis=1)
    hit = ranked == gold[:, None]
    return np.where(hit.any(1), hit.argmax(1) + 1.0, np.inf)


def mrr_at(ranks: np.ndarray, k: int = 10) -> float:
    return float(np.where(ranks <= k, 1.0 / ranks, 0.0).mean())


def fit_weight(dense: np.ndarray, lexical: np.ndarray, cands: np.ndarray, gold: np.ndarray,
               method: str = "convex", grid=GRID) -> tuple[float, dict]:
    """The grid weight with the best MRR@10 of the gold candidates (smallest weight on a tie; each gold ranked
    after its ties) -> (weight, record) where record holds the grid and, per weight, MRR@10 and R@1, for
    `Fusion.fitted`."""
    if len(gold) == 0:
        raise MixretError("no validation pairs to fit the fusion weight on")
    mrr, r1 = [], []
    for w in grid:
        ranks = gold_ranks(fused_order(dense, lexical, cands, w, method, losers=gold)[0], cands, gold)
        mrr.append(mrr_at(ranks))
        r1.append(float((ranks == 1).mean()))
    best = int(np.argmax(mrr))
    return float(grid[best]), {"pairs": int(len(gold)), "grid": [float(w) for w in grid],
                               "mrr@10": [round(m, 5) for m in mrr], "r@1": [round(r, 5) for r in r1]}
