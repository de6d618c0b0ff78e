"""Fusion of BM25 and dense scores: the end points reproduce each side exactly, the weight is fitted on
validation pairs only, and a fused ranking beats either side on a corpus built so that each side knows half."""
import numpy as np
import pytest

from mixret.errors import MixretError
from mixret.retrieval.fusion import Fusion, candidate_union, fit_weight, fused_order, gold_ranks, mrr_at
from mixret.retrieval.search import Retriever

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


def test_fitted_weight_combines_both_sides_and_follows_the_pairs_it_is_fitted_on():
    docs, emb, queries, q_emb = half_and_half()
    r = Retriever(emb, docs)

    def fit(val):
        cands, dense, lexical = r.fusion_candidates(q_emb[val], [queries[i] for i in val], depth=20)
        return fit_weight(dense, lexical, cands, val)

    val = np.arange(0, 100)                       # fit on the first half only
    weight, record = fit(val)
    assert 0.0 < weight < 1.0 and record["pairs"] == 100
    assert max(record["r@1"]) > 0.9 and record["r@1"][0] < 0.6 and record["r@1"][-1] < 0.6
    # fitted on the lexical queries alone, the weight is 0 (BM25's ranking); on the dense ones alone, one that
    # finds them all where BM25 finds none (BM25 scores them all 0: any dense weight ranks by the dense side)
    lexical_weight, lexical_record = fit(val[::2])
    assert lexical_weight == 0.0 and lexical_record["r@1"][0] == 1.0 and lexical_record["r@1"][-1] < 0.2
    dense_weight, dense_record = fit(val[1::2])
    assert dense_weight > 0.0 and dense_record["r@1"][dense_record["grid"].index(dense_weight)] == 1.0
    assert dense_record["r@1"][0] == 0.0
    # the fitted weight then ranks the held-out half: both kinds of gold found
    r.fusion = Fusion(weight=weight)
    test = np.arange(100, 200)
    res = r.search("fusion", 1, query_emb=q_emb[test], queries=[queries[i] for i in test])
    assert (res.indices[:, 0] == test).mean() > 0.9


def test_rrf_gives_equal_scores_equal_ranks():
    """A tie on one side is a tie in the fused score (then broken as any fused tie), not a rank by index."""
    cands = np.array([[2, 5, 8, 9]])
    dense, lexical = np.array([[0.3, 0.7, 0.3, 0.1]]), np.array([[1.0, 1.0, 1.0, 1.0]])
    _, fused = fused_order(dense, lexical, cands, 0.5, "rrf")
    expected = 0.5 / (60 + np.array([1, 2, 2, 4])) + 0.5 / 61
    np.testing.assert_allclose(fused[0], expected, rtol=1e-12)


def test_candidate_union_and_gold_ranks():
    cands = candidate_union(np.array([[3, 1, -1]]), np.array([[1, 7, 2]]))
    assert cands.tolist() == [[1, 2, 3, 7]]
    dense = np.array([[0.1, 0.9, 0.5, 0.5]])
    lexical = np.zeros((1, 4))
    order, fused = fused_order(dense, lexical, cands, 1.0)
    assert np.take_along_axis(cands, order, 1).tolist() == [[2, 3, 7, 1]]  # 3 and 7 tie: lower index first
    assert gold_ranks(order, cands, np.array([7])).tolist() == [3.0]
    assert gold_ranks(order, cands, np.array([5])).tolist() == [np.inf]


def test_fitting_ranks_each_gold_after_its_ties():
    """Known rankings with ties: the gold goes after every candidate with its fused score (float32, as a
    search returns it), whatever the raw scores and corpus indices that order the other candidates."""
    cands = np.array([[1, 2, 3, 7]])
    dense, lexical = np.array([[0.1, 0.9, 0.5, 0.5]]), np.zeros((1, 4))
    for gold in (3, 7):                                             # 3 and 7 tie: either one as gold is third
        order, _ = fused_order(dense, lexical, cands, 1.0, losers=np.array([gold]))
        assert gold_ranks(order, cands, np.array([gold])).tolist() == [3.0]
        assert np.take_along_axis(cands, order, 1)[0, :2].tolist() == [2, 3 if gold == 7 else 7]
    # equal fused scores from different raw scores: 1 (dense 1, bm25 0) ties 2 (dense 0, bm25 1) at weight 0.5
    cands = np.array([[1, 2, 5]])
    dense, lexical = np.array([[1.0, 0.0, 0.2]]), np.array([[0.0, 1.0, 0.2]])
    order, fused = fused_order(dense, lexical, cands, 0.5)
    assert np.take_along_axis(cands, order, 1).tolist() == [[1, 2, 5]] and fused[0, 0] == fused[0, 1]
    order, _ = fused_order(dense, lexical, cands, 0.5, losers=np.array([1]))
    assert np.take_along_axis(cands, order, 1).tolist() == [[2, 1, 5]]
    assert gold_ranks(order, cands, np.array([1])).tolist() == [2.0]
    # a gap below float32's resolution is a tie, as in evaluation; one above it is not
    dense = np.array([[1.0, 1.0 - 1e-12, 0.0], [1.0, 1.0 - 1e-3, 0.0]])
    cands = np.array([[4, 6, 8], [4, 6, 8]])
    order, _ = fused_order(dense, np.zeros((2, 3)), cands, 1.0, losers=np.array([4, 4]))
    assert gold_ranks(order, cands, np.array([4, 4])).tolist() == [2.0, 1.0]
    # constant scores: the gold is last, so R@1 is 0 at every weight and MRR@10 is 1 / (candidates)
    cands = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    for method in ("convex", "rrf"):
        weight, record = fit_weight(np.ones((2, 4)), np.zeros((2, 4)), cands, np.array([0, 3]), method)
        assert weight == 0.0 and set(record["r@1"]) == {0.0} and set(record["mrr@10"]) == {0.25}, method


@pytest.mark.parametrize("method", ["convex", "rrf"])
def test_fitted_metrics_are_those_evaluation_measures(method):
    """R@1 and MRR@10 recorded per grid weight equal those of a fusion search with the same weight that puts
    each gold after its ties (what `evaluate` runs), on a corpus full of ties: identical embeddings for half of
    the documents, overlapping words, and as gold the dense winner, which wins its ties by corpus index."""
    texts, emb, queries, q_emb = corpus()
    emb[::2] = emb[0]                                                   # dense ties among the even documents
    q_emb[:6] = emb[0]                                                  # half the queries score all of them 1.0
    r = Retriever(emb, texts)
    cands, dense, lexical = r.fusion_candidates(q_emb, queries, depth=15)
    gold = np.take_along_axis(cands, fused_order(dense, lexical, cands, 1.0, method)[0][:, :1], 1)[:, 0]
    weight, record = fit_weight(dense, lexical, cands, gold, method)
    lost_ties = 0
    for w, r1, mrr in zip(record["grid"], record["r@1"], record["mrr@10"]):
        r.fusion = Fusion(weight=w, method=method, depth=15)
        found = r.search("fusion", 10, query_emb=q_emb, queries=queries, losers=gold).indices == gold[:, None]
        ranks = np.where(found.any(1), found.argmax(1) + 1.0, np.inf)
        assert (r1, mrr) == (round(float((ranks == 1).mean()), 5), round(mrr_at(ranks), 5)), w
        by_index = gold_ranks(fused_order(dense, lexical, cands, w, method)[0], cands, gold)
        lost_ties += int(((by_index < ranks) & (by_index <= 10)).sum())  # ties the index order would have won
    assert lost_ties > 12
