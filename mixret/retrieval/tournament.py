"""The matcher tournament: groups of candidates scored by a matcher, winners advancing, until k remain;
pessimistic about ties."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from mixret.errors import MixretError

# score_fn(queries [B, E], candidates [B, N, E], mask [B, N] bool, bm25 [B, N] or None) -> logits [B, N];
# bm25: the candidates' BM25 scores for their query, given to the tournament for a matcher that takes them
ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


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
