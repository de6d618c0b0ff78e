"""Fusion of BM25 and dense scores: the end points reproduce each side exactly, the weight is fitted on
validation pairs only, and a fused ranking beats either side on a corpus built so that each side knows half."""
import numpy as np
import pytest

from mixret.errors import MixretError
from mixret.fusion import Fusion, candidate_union, fit_weight, fused_order, gold_ranks
from mixret.search import Retriever

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
         "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]


def corpus(n=60, dim=16, seed=0):
    """Texts with overlapping words (many BM25 ties and near ties) and random embeddings."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 6))) for _ in range(n)]
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    queries = [" ".join(rng.choice(WORDS, size=2)) for _ in range(12)]
    q_emb = rng.normal(size=(12, dim)).astype(np.float32)
    return texts, emb, queries, q_emb


@pytest.mark.parametrize("method", ["convex", "rrf"])
def test_weight_zero_is_bm25_and_one_is_dense_exactly(method):
    texts, emb, queries, q_emb = corpus()
    for weight, mode in ((0.0, "bm25"), (1.0, "vector")):
        r = Retriever(emb, texts, fusion=Fusion(weight=weight, method=method, depth=15))
        fused = r.search("fusion", 10, query_emb=q_emb, queries=queries)
        alone = r.search(mode, 10, query_emb=q_emb, queries=queries)
        np.testing.assert_array_equal(fused.indices, alone.indices)


def test_bm25_ties_are_ranked_by_corpus_index():
    texts = ["apple pie", "banana", "apple pie", "apple pie", "cherry"]
    r = Retriever(None, texts)
    res = r.search("bm25", 4, queries=["apple pie"])
    assert res.indices[0, :3].tolist() == [0, 2, 3]


def test_fusion_needs_a_weight():
    texts, emb, queries, q_emb = corpus()
    with pytest.raises(MixretError, match="fusion weight"):
        Retriever(emb, texts).search("fusion", 5, query_emb=q_emb, queries=queries)
    with pytest.raises(MixretError, match="between 0 and 1"):
        Fusion(weight=1.5)


def half_and_half(n=200, dim=32, seed=1):
    """Query i's gold is document i. For even i only BM25 can find it (a unique word shared by query and
    document, random embeddings); for odd i only the dense side (query embedding near the document's, query
    words found in no document)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    docs, queries, q_emb = [], [], []
    for i in range(n):
        filler = " ".join(rng.choice(WORDS, size=3))
        docs.append(f"{filler} tok{i}x")
        queries.append(f"tok{i}x" if i % 2 == 0 else f"unseen{i}y")
        q_emb.append(rng.normal(size=dim) if i % 2 == 0 else emb[i] + 0.1 * rng.normal(size=dim))
    return docs, emb, queries, np.asarray(q_emb, dtype=np.float32)


def test_fitted_weight_combines_both_sides_and_uses_only_the_validation_pairs():
    docs, emb, queries, q_emb = half_and_half()
    r = Retriever(emb, docs)
    val = np.arange(0, 100)                       # fit on the first half only
    cands, dense, lexical = r.fusion_candidates(q_emb[val], [queries[i] for i in val], depth=20)
    weight, record = fit_weight(dense, lexical, cands, val)
    assert 0.0 < weight < 1.0 and record["pairs"] == 100
    assert max(record["r@1"]) > 0.9 and record["r@1"][0] < 0.6 and record["r@1"][-1] < 0.6
    # fitting sees only what it is given: changing the other half's queries changes nothing
    q_emb2 = q_emb.copy()
    q_emb2[100:] = 0.0
    cands2, dense2, lexical2 = r.fusion_candidates(q_emb2[val], [queries[i] for i in val], depth=20)
    assert fit_weight(dense2, lexical2, cands2, val)[0] == weight
    # the fitted weight then ranks the held-out half: both kinds of gold found
    r.fusion = Fusion(weight=weight)
    test = np.arange(100, 200)
    res = r.search("fusion", 1, query_emb=q_emb[test], queries=[queries[i] for i in test])
    assert (res.indices[:, 0] == test).mean() > 0.9


def test_candidate_union_and_gold_ranks():
    cands = candidate_union(np.array([[3, 1, -1]]), np.array([[1, 7, 2]]))
    assert cands.tolist() == [[1, 2, 3, 7]]
    dense = np.array([[0.1, 0.9, 0.5, 0.5]])
    lexical = np.zeros((1, 4))
    order, fused = fused_order(dense, lexical, cands, 1.0)
    assert np.take_along_axis(cands, order, 1).tolist() == [[2, 3, 7, 1]]  # 3 and 7 tie: lower index first
    assert gold_ranks(order, cands, np.array([7])).tolist() == [3.0]
    assert gold_ranks(order, cands, np.array([5])).tolist() == [np.inf]
