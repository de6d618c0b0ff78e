"""Score features of the matcher: per-candidate BM25 and cosine fed to each slot, in training and in search."""
import json

import numpy as np
import pytest
import torch
from close import assert_close

from mixret import io
from mixret.errors import MixretError
from mixret.models.matcher import Matcher, MatcherConfig, score_candidates
from mixret.retrieval.bm25 import BM25Index
from mixret.retrieval.search import Retriever
from mixret.training.matcher import as_pair_set, lexical_pool, train_matcher

E = 16
WORDS = [f"w{i:04d}" for i in range(4000)]


def planted(n: int, seed: int):
    """Pairs whose embeddings carry no information (independent noise) and whose texts share one rare word:
    only BM25 can tell a query's target from the others."""
    rng = np.random.default_rng(seed)
    rare = rng.choice(len(WORDS), n, replace=False)
    common = ["alpha", "beta", "gamma", "delta", "omega"]
    queries = [f"{WORDS[r]} {rng.choice(common)}" for r in rare]
    targets = [f"{' '.join(rng.choice(common, 4))} {WORDS[r]} {rng.choice(common)}" for r in rare]
    q = rng.standard_normal((n, E)).astype(np.float32)
    t = rng.standard_normal((n, E)).astype(np.float32)
    return q, t, (queries, targets)


def config(**kw) -> MatcherConfig:
    return MatcherConfig(**{"emb_dim": E, "d_model": 32, "n_layers": 1, "context": 16, **kw})


@pytest.fixture(scope="module")
def planted_runs():
    """The same planted pairs, a matcher trained with the bm25 feature and one without."""
    q, t, texts = planted(700, seed=0)
    tr, te = slice(100, None), slice(0, 100)
    runs = {}
    for name, features in (("bm25", ["bm25"]), ("none", [])):
        runs[name] = train_matcher(q[tr], t[tr], q[te], t[te], config(features=features), epochs=4, batch_size=64,
                                   lr=3e-3, seed=0, progress=False, train_texts=(texts[0][tr], texts[1][tr]),
                                   test_texts=(texts[0][te], texts[1][te]))
    return runs, (q, t, texts)


def test_only_the_bm25_feature_finds_the_planted_target(planted_runs):
    runs, _ = planted_runs
    with_bm25, without = runs["bm25"][1], runs["none"][1]
    chance = with_bm25["chance_top1"]
    assert with_bm25["test"]["top1"] > 0.9 and with_bm25["test_padded"]["top1"] > 0.9
    assert without["test"]["top1"] < 3 * chance          # the embeddings are noise: nothing to learn from them
    assert with_bm25["config"]["features"] == ["bm25"] and without["config"]["features"] == []


def test_features_change_the_scores(planted_runs):
    """The logits of a bm25 matcher move with the BM25 scores alone (same embeddings)."""
    runs, (q, t, _) = planted_runs
    matcher = runs["bm25"][0]
    cands = torch.from_numpy(t[None, :15])
    lex = torch.zeros(1, 15)
    lex[0, 3] = 9.0
    a = score_candidates(matcher, q[:1], cands, bm25=lex)[0]
    lex2 = torch.zeros(1, 15)
    lex2[0, 7] = 9.0
    b = score_candidates(matcher, q[:1], cands, bm25=lex2)[0]
    assert a.argmax() == 3 and b.argmax() == 7


def test_search_with_features_equals_direct_scoring(planted_runs):
    """hybrid and tree over a corpus of one group give exactly the matcher's own scores of that group, with
    the candidates' BM25 scores computed by the retriever; and find the planted targets."""
    runs, (q, t, (queries, targets)) = planted_runs
    matcher = runs["bm25"][0]
    corpus, corpus_texts, qe, qt = t[:15], targets[:15], q[:15], queries[:15]
    retriever = Retriever(corpus, corpus_texts, matcher=matcher)
    bm25 = BM25Index(corpus_texts)
    full = np.broadcast_to(np.arange(15), (15, 15))
    direct = score_candidates(matcher, qe, corpus[full], bm25=bm25.scores_of(qt, full))
    tree = retriever.search("tree", 5, query_emb=qe, queries=qt)
    np.testing.assert_array_equal(tree.indices, np.argsort(-direct, axis=1, kind="stable")[:, :5])
    assert_close(tree.scores, np.take_along_axis(direct, tree.indices, 1), name="tree")
    hybrid = retriever.search("hybrid", 5, query_emb=qe, queries=qt, shortlist=10, shortlist_from="bm25")
    _, short = bm25.search(qt, 10)
    direct_short = score_candidates(matcher, qe, corpus[short], bm25=bm25.scores_of(qt, short))
    assert_close(hybrid.scores, -np.sort(-direct_short, axis=1)[:, :5], name="hybrid")
    assert (tree.indices[:, 0] == np.arange(15)).mean() > 0.9


def test_tournament_carries_bm25_scores_with_their_candidates(planted_runs):
    """Over several rounds, each candidate keeps its own BM25 score: the tree finds the planted targets in a
    corpus of 600 (the embeddings say nothing)."""
    runs, (q, t, (queries, targets)) = planted_runs
    retriever = Retriever(t[100:], targets[100:], matcher=runs["bm25"][0])
    res = retriever.search("tree", 1, query_emb=q[100:160], queries=queries[100:160])
    assert (res.passes > 1).all()
    assert (res.indices[:, 0] == np.arange(60)).mean() > 0.8


def test_a_bm25_matcher_needs_the_query_texts(planted_runs):
    runs, (q, t, (_, targets)) = planted_runs
    matcher = runs["bm25"][0]
    with pytest.raises(MixretError, match="BM25 score"):
        score_candidates(matcher, q[:1], t[None, :5])
    with pytest.raises(MixretError, match="query texts"):
        Retriever(t[:15], targets[:15], matcher=matcher).search("tree", 3, query_emb=q[:2])
    with pytest.raises(MixretError, match="texts"):
        train_matcher(q[100:], t[100:], q[:100], t[:100], config(features=["bm25"]), epochs=1, progress=False)


def test_cosine_feature_is_computed_from_the_embeddings():
    """z-scored within the set, over the present candidates only; no caller input needed."""
    torch.manual_seed(0)
    matcher = Matcher(config(features=["cosine"])).eval()
    q = torch.randn(2, E)
    c = torch.randn(2, 5, E)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    f = matcher.slot_features(q, c, mask, None)[..., 0]                     # [2, 5]
    cos = torch.nn.functional.cosine_similarity(q[:, None], c, dim=-1)
    z = (cos[0] - cos[0].mean()) / cos[0].std(correction=0)
    assert_close(f[0], z, name="full set")
    z1 = (cos[1, :3] - cos[1, :3].mean()) / cos[1, :3].std(correction=0)
    assert_close(f[1, :3], z1, name="padded set")
    assert (f[1, 3:] == 0).all()
    logits = matcher(q, c, mask)
    assert torch.isinf(logits[1, 3:]).all() and torch.isfinite(logits[1, :3]).all()


def test_features_config_round_trip(tmp_path):
    torch.manual_seed(0)
    matcher = Matcher(config(features=["cosine", "bm25"])).eval()
    assert matcher.config.features == ["bm25", "cosine"]          # canonical order
    matcher.save_pretrained(tmp_path)
    loaded = Matcher.from_pretrained(tmp_path)
    assert loaded.config == matcher.config
    q, c, lex = torch.randn(3, E), torch.randn(3, 6, E), torch.rand(3, 6) * 5
    assert_close(loaded(q, c, bm25=lex), matcher(q, c, bm25=lex))
    for bad in (["bm25", "bm25"], ["tfidf"], "bm25"):
        with pytest.raises(MixretError, match="features"):
            config(features=bad)


def test_a_matcher_saved_without_features_still_loads(tmp_path):
    """config.json written before features existed (no such key) loads as a matcher without features."""
    torch.manual_seed(0)
    matcher = Matcher(config()).eval()
    matcher.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / io.CONFIG_NAME).read_text())
    raw.pop("features")
    (tmp_path / io.CONFIG_NAME).write_text(json.dumps(raw))
    loaded = Matcher.from_pretrained(tmp_path)
    assert loaded.config.features == [] and not hasattr(loaded, "feat_in")
    q, c = torch.randn(2, E), torch.randn(2, 4, E)
    assert_close(loaded(q, c), matcher(q, c))


def test_hard_negative_pool_mixes_bm25_and_dense_neighbours():
    q, t, texts = planted(60, seed=1)
    pairs = as_pair_set(q, t, "train", 8, texts)
    true = pairs.true_index.tolist()
    dense = torch.stack([torch.tensor([j for j in range(60) if j != true[i]][:6]) for i in range(60)])
    pool = lexical_pool(pairs, BM25Index(pairs.target_texts), 6, dense)
    assert pool.shape == (60, 6)
    for i, row in enumerate(pool.tolist()):
        assert len(set(row)) == 6 and true[i] not in row
        assert row[0] == dense[i, 0]                                   # interleaved: dense first, then BM25
        assert set(row) - set(dense[i].tolist())                        # BM25 neighbours are in it too
