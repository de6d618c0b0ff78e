import json
import math
import warnings

import numpy as np
import pytest
import torch
from close import assert_close

from mixret.errors import MixretError
from mixret.models.encode import EmbeddingSpec
from mixret.models.matcher import Matcher, MatcherConfig, score_candidates
from mixret.retrieval.bm25 import BM25Index
from mixret.retrieval.index import VectorIndex
from mixret.retrieval.search import Retriever
from mixret.retrieval.tournament import matcher_score_fn, tournament, tournament_passes, tree_search


def dot_score(calls=None):
    """A ScoreFn whose logit for a candidate ignores the other candidates: q . c."""
    def score(q, c, mask, bm25):
        if calls is not None:
            calls.append(mask.shape)
        return np.einsum("be,bne->bn", q, c)
    return score


def no_mixing_matcher(emb_dim=16, context=8) -> Matcher:
    """A real Matcher whose token-mixing matrices are zero: each slot is scored on its own."""
    m = Matcher(MatcherConfig(emb_dim=emb_dim, d_model=32, n_layers=2, context=context))
    with torch.no_grad():
        for block in m.blocks:
            block.tokens.mix.weight.zero_()
            block.tokens.mix.bias.zero_()
    return m.eval()


# -- tournament ---------------------------------------------------------------------------------

def test_passes_formula():
    G = 31  # context 32
    for M in (2, 31, 32, 100, 1000, 12345):
        assert tournament_passes(M, 1, G) == max(1, math.ceil((M - 1) / (G - 1)))  # about M / (context - 2)
    assert tournament_passes(31, 10, 31) == 1
    assert tournament_passes(32, 10, 31) == 2
    assert tournament_passes(1000, 10, 31) == math.ceil(990 / 21)
    assert tournament_passes(0, 1, 31) == 0


@pytest.mark.parametrize("M,G,k", [(1, 7, 1), (5, 7, 3), (7, 7, 7), (8, 7, 1), (100, 7, 1), (100, 7, 6),
                                   (257, 31, 10), (1000, 2, 1), (1000, 31, 1), (999, 15, 5)])
def test_tree_search_dot_product_is_exact(M, G, k):
    rng = np.random.default_rng(M + G + k)
    corpus = rng.standard_normal((M, 8)).astype(np.float32)
    query = rng.standard_normal(8).astype(np.float32)
    calls = []
    idx, scores, passes = tree_search(dot_score(calls), query, corpus, k, G)
    exact = np.argsort(-(corpus @ query), kind="stable")[:k]
    np.testing.assert_array_equal(idx, exact)
    assert_close(scores, (corpus @ query)[exact])
    assert passes == tournament_passes(M, k, G)
    assert sum(shape[0] for shape in calls) == passes          # one (query, group) row per pass
    assert all(shape[1] <= G for shape in calls)


def test_tournament_batches_queries_in_lockstep():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((300, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    calls = []
    idx, scores, passes = tournament(dot_score(calls), queries, corpus, 4, 31)
    np.testing.assert_array_equal(idx, np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :4])
    assert (passes == tournament_passes(300, 4, 31)).all()
    rounds = 0
    n = 300
    while n > 31:  # one score_fn call per round, plus the final one
        n = n % 31 + (n // 31) * 4
        rounds += 1
    assert len(calls) == rounds + 1


def test_tournament_skips_missing_candidates():
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((50, 4)).astype(np.float32)
    queries = rng.standard_normal((2, 4)).astype(np.float32)
    cands = np.full((2, 40), -1)
    cands[0, :30] = np.arange(30)          # 30 real candidates then padding
    cands[1, [0, 15, 39]] = [7, 8, 9]      # 3 real candidates spread out
    idx, scores, passes = tournament(dot_score(), queries, corpus, 5, 7, candidates=cands)
    s = queries @ corpus.T
    np.testing.assert_array_equal(idx[0], np.argsort(-s[0, :30], kind="stable")[:5])
    expected = 7 + np.argsort(-s[1, 7:10], kind="stable")
    np.testing.assert_array_equal(idx[1, :3], expected)
    assert (idx[1, 3:] == -1).all() and np.isneginf(scores[1, 3:]).all()
    assert passes[1] < passes[0]           # groups with no candidate are not counted


def test_tournament_rejects_k_not_below_group_size():
    corpus = np.zeros((100, 4), np.float32)
    with pytest.raises(MixretError, match="k must be below 7"):
        tree_search(dot_score(), np.zeros(4, np.float32), corpus, 7, 7)
    with pytest.raises(MixretError, match="corpus size 100"):
        tree_search(dot_score(), np.zeros(4, np.float32), corpus, 101, 7)


def test_tree_search_with_real_matcher_equals_exhaustive_group_scoring():
    """A Matcher without token mixing scores each candidate on its own: the tournament's top-k must equal
    the top-k of scoring the whole corpus exhaustively, one group of context-1 at a time."""
    torch.manual_seed(0)
    matcher = no_mixing_matcher(emb_dim=16, context=8)
    G = matcher.config.context - 1
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((200, 16)).astype(np.float32)
    query = rng.standard_normal(16).astype(np.float32)
    groups = [corpus[i:i + G] for i in range(0, len(corpus), G)]
    exhaustive = np.concatenate([score_candidates(matcher, query[None], g[None])[0] for g in groups])
    for k in (1, 3):
        idx, scores, passes = tree_search(matcher_score_fn(matcher), query, corpus, k, G)
        np.testing.assert_array_equal(idx, np.argsort(-exhaustive, kind="stable")[:k])
        assert_close(scores, exhaustive[idx])
        assert passes == tournament_passes(200, k, G) == math.ceil((200 - k) / (G - k))


def test_tree_search_with_mixing_matcher_follows_the_bracket():
    """With token mixing, logits depend on the set; check the batched tournament against a plain loop
    that scores one group at a time and keeps each group's best, and that a corpus of one group is
    ranked by a single matcher pass."""
    torch.manual_seed(0)
    matcher = Matcher(MatcherConfig(emb_dim=16, d_model=32, n_layers=2, context=8)).eval()
    G = 7
    rng = np.random.default_rng(2)
    corpus = rng.standard_normal((60, 16)).astype(np.float32)
    query = rng.standard_normal(16).astype(np.float32)
    idx, _, passes = tree_search(matcher_score_fn(matcher), query, corpus, 1, G)

    survivors, count = list(range(60)), 0
    while len(survivors) > G:
        n_full = len(survivors) // G
        winners = []
        for g in range(n_full):
            members = survivors[g * G:(g + 1) * G]
            logits = score_candidates(matcher, query[None], corpus[members][None])[0]
            winners.append(members[int(np.argmax(logits))])
            count += 1
        survivors = survivors[n_full * G:] + winners
    final = score_candidates(matcher, query[None], corpus[survivors][None])[0]
    assert idx[0] == survivors[int(np.argmax(final))]
    assert passes == count + 1 == tournament_passes(60, 1, G)

    small = corpus[:5]
    idx, scores, passes = tree_search(matcher_score_fn(matcher), query, small, 5, G)
    one_pass = score_candidates(matcher, query[None], small[None])[0]
    np.testing.assert_array_equal(idx, np.argsort(-one_pass, kind="stable"))
    assert passes == 1


# -- vector index -------------------------------------------------------------------------------

def test_flat_index_returns_exact_neighbours():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 24)).astype(np.float32) + 0.5
    q = rng.standard_normal((7, 24)).astype(np.float32)
    scores, idx = VectorIndex.build(x, "Flat", "ip").search(q, 10)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cos = qn @ xn.T
    np.testing.assert_array_equal(idx, np.argsort(-cos, axis=1)[:, :10])
    assert_close(scores, np.take_along_axis(cos, idx, 1))

    scores, idx = VectorIndex.build(x, "Flat", "l2").search(q, 10)
    d2 = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, np.argsort(d2, axis=1)[:, :10])
    assert_close(scores, np.take_along_axis(d2, idx, 1))


def test_index_save_load_and_refusals(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 16)).astype(np.float32)
    index = VectorIndex.build(x, "HNSW32", meta={"model_hash": "abc"})
    index.save(tmp_path)
    assert json.loads((tmp_path / "index.json").read_text())["count"] == 100
    assert not list(tmp_path.glob(".*tmp"))
    loaded = VectorIndex.load(tmp_path, expected_dim=16, expected_spec=EmbeddingSpec("abc", None, None),
                              expected_count=100)
    np.testing.assert_array_equal(loaded.search(x[:3], 5)[1], index.search(x[:3], 5)[1])
    assert loaded.factory == "HNSW32" and loaded.meta["model_hash"] == "abc"

    with pytest.raises(MixretError, match="built from another model"):
        VectorIndex.load(tmp_path, expected_dim=32)
    with pytest.raises(MixretError, match="model 'def' for the corpus embeddings .* but 'abc' for the index"):
        VectorIndex.load(tmp_path, expected_spec=EmbeddingSpec("def", "last", 64))
    with pytest.raises(MixretError, match="corpus has 99"):
        VectorIndex.load(tmp_path, expected_count=99)
    with pytest.raises(MixretError, match="dim 16"):
        loaded.search(np.zeros((1, 8), np.float32), 3)
    with pytest.raises(MixretError, match="corpus size 100"):
        loaded.search(x[:1], 101)
    (tmp_path / "index.faiss").unlink()
    with pytest.raises(MixretError, match="index.faiss: index file not found"):
        VectorIndex.load(tmp_path)
    with pytest.raises(MixretError, match="index.json: index file not found"):
        VectorIndex.load(tmp_path / "nowhere")


def test_ivf_shrinks_nlist_and_pq_errors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    with pytest.warns(UserWarning, match="IVF1024 needs at least 39936 vectors.*using IVF10"):
        index = VectorIndex.build(x, "IVF1024,Flat")
    assert index.factory == "IVF10,Flat"
    _, idx = index.search(x[:5], 1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(5))  # each vector finds itself
    with pytest.raises(MixretError, match="not divisible by 32"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the IVF4096 shrink notice comes first
        VectorIndex.build(x, "IVF4096,PQ32")
    with pytest.raises(MixretError, match="needs at least 256 vectors"):
        VectorIndex.build(x[:100], "PQ8")
    with pytest.raises(MixretError, match="invalid FAISS factory string 'Nonsense'"):
        VectorIndex.build(x, "Nonsense")
    with pytest.raises(MixretError, match="metric"):
        VectorIndex.build(x, "Flat", metric="cosine")


# -- BM25 and the retriever ---------------------------------------------------------------------

TEXTS = ["a fast web server for static files", "terminal music player with playlists",
         "library for parsing XML documents", "tools to compress and extract zip archives",
         "a puzzle game with coloured blocks", "python bindings for the XML parsing library"]


def test_bm25_finds_the_lexical_match():
    bm25 = BM25Index(TEXTS)
    scores, idx = bm25.search(["zip archives", "music playlists", "the of and"], 3)
    assert idx[0, 0] == 3 and idx[1, 0] == 1
    assert (scores[2] == 0).all()  # only stopwords: no match, still k results
    with pytest.raises(MixretError, match="corpus size 6"):
        bm25.search(["xml"], 7)


def test_bm25_matches_word_forms_by_their_stem():
    texts = ["a library for queueing jobs in the background", "a job scheduler for clusters of machines",
             "queue of messages between processes"]
    bm25 = BM25Index(texts)
    _, idx = bm25.search(["simple job queues"], 3)
    assert idx[0, 0] == 0          # "job" and "queues" both match, as "jobs" and "queueing"
    scores = bm25.scores("queues")
    assert scores[0] > 0 and scores[2] > 0 and scores[1] == 0


def test_retriever_modes_agree():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((len(TEXTS) * 20, 16)).astype(np.float32)
    texts = [f"{t} {i}" for i in range(20) for t in TEXTS]
    q = emb[[3, 50, 77]] + 0.01 * rng.standard_normal((3, 16)).astype(np.float32)
    matcher = no_mixing_matcher(emb_dim=16, context=8)
    r = Retriever(emb, texts, index=VectorIndex.build(emb, "HNSW32"), matcher=matcher)
    with pytest.raises(MixretError, match="index holds 119 vectors"):
        Retriever(emb, texts, index=VectorIndex.build(emb[:119]))
    vector = r.search("vector", 5, query_emb=q)
    assert list(vector.indices[:, 0]) == [3, 50, 77] and (vector.passes == 0).all()
    tree = r.search("tree", 3, query_emb=q)
    assert (tree.passes == tournament_passes(120, 3, 7)).all()
    full = r.search("hybrid", 3, query_emb=q, shortlist=1000)  # shortlist of the whole corpus = tree
    np.testing.assert_array_equal(full.indices, tree.indices)  # the same ranking, in the same order
    assert_close(full.scores, tree.scores)
    hybrid = r.search("hybrid", 3, query_emb=q, shortlist=20)
    assert (hybrid.passes == tournament_passes(20, 3, 7)).all()
    lexical = r.search("hybrid", 3, query_emb=q, queries=["zip"] * 3, shortlist=20, shortlist_from="bm25")
    assert set(lexical.indices.ravel()) <= set(range(3, 120, 6))  # only texts with "zip" score above 0
    assert r.search("bm25", 2, queries=["music player"]).indices[0, 0] % 6 == 1

    with pytest.raises(MixretError, match="k=121 but the corpus has 120"):
        r.search("vector", 121, query_emb=q)
    with pytest.raises(MixretError, match="needs a matcher"):
        Retriever(emb, texts).search("tree", 3, query_emb=q)
    with pytest.raises(MixretError, match="other model's embeddings"):
        Retriever(emb[:, :8], texts, matcher=matcher)
    with pytest.raises(MixretError, match="dim 8"):
        r.search("vector", 3, query_emb=q[:, :8])


# -- the command line ---------------------------------------------------------------------------

def invoke(*args):
    from click.testing import CliRunner

    from mixret.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny_lm(d_model: int, seed: int):
    from mixret.models import ModelConfig, build_model
    from mixret.tokenizer import ByteTokenizer
    torch.manual_seed(seed)
    model = build_model(ModelConfig(vocab_size=260, d_model=d_model, n_layers=2, context=64)).eval()
    model.tokenizer = ByteTokenizer()
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two tiny untrained models, 120 bundled documents embedded and indexed with the first, a matcher."""
    from mixret import io
    from mixret.data import bundled_pairs_path, load_pairs, write_pairs_jsonl
    root = tmp_path_factory.mktemp("cli")
    write_pairs_jsonl(load_pairs(bundled_pairs_path())[:120], root / "pairs.jsonl")
    tiny_lm(32, 0).save_pretrained(root / "lm")
    tiny_lm(32, 1).save_pretrained(root / "other_lm")
    tiny_lm(48, 2).save_pretrained(root / "wide_lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # documents longer than the tiny context
        for lm, out in (("lm", "emb"), ("other_lm", "other_emb"), ("wide_lm", "wide_emb")):
            res = invoke("embed", root / "pairs.jsonl", "--model", root / lm, "--field", "document", "--out", root / out)
            assert res.exit_code == 0, res.output
    res = invoke("index", root / "emb")
    assert res.exit_code == 0, res.output
    assert "Flat index (ip) over 120 vectors of dim 32" in res.output
    model_hash = io.file_hash(root / "lm" / io.WEIGHTS_NAME)
    Matcher(MatcherConfig(emb_dim=32, d_model=32, n_layers=1, context=16, embedder=model_hash)).save_pretrained(
        root / "matcher")
    return root


def test_cli_search_modes(corpus):
    from mixret.retrieval.embeddings import load_emb_dir
    _, ids, texts, _ = load_emb_dir(corpus / "emb")
    res = invoke("search", "Perl bindings for OpenLDAP", "--index", corpus / "emb", "-k", 5)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["rank", "id", "score", "text"] and len(lines) == 6
    assert all(len(line) < 200 for line in lines)

    res = invoke("search", texts[7], "--index", corpus / "emb", "-k", 3, "--json")  # a document finds itself
    hits = [json.loads(line) for line in res.stdout.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["id"] == ids[7] and hits[0]["text"] == texts[7]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)

    res = invoke("search", "OpenLDAP perl", "--index", corpus / "emb", "--mode", "bm25", "-k", 1, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["id"] == "libnet-ldapapi-perl"

    res = invoke("search", "a game", "--index", corpus / "emb", "--mode", "tree", "--matcher", corpus / "matcher",
                 "-k", 3)
    assert res.exit_code == 0, res.output
    assert f"tree: {tournament_passes(120, 3, 15)} matcher forward passes" in res.stderr
    res = invoke("search", "a game", "--index", corpus / "emb", "--mode", "hybrid", "--matcher", corpus / "matcher",
                 "--shortlist", 40, "--json")
    assert res.exit_code == 0 and len(res.stdout.splitlines()) == 10
    assert f"hybrid: {tournament_passes(40, 10, 15)} matcher forward passes" in res.stderr


def test_cli_index_factories(corpus, tmp_path):
    import shutil
    emb = tmp_path / "emb"
    shutil.copytree(corpus / "emb", emb)
    res = invoke("index", emb, "--factory", "IVF1024,Flat", "--metric", "l2")
    assert res.exit_code == 0, res.output
    assert "warning: IVF1024 needs at least 39936 vectors to train, the corpus has 120: using IVF3" in res.stderr
    assert json.loads((emb / "index.json").read_text())["factory"] == "IVF3,Flat"
    res = invoke("search", "perl", "--index", emb, "-k", 2)
    assert res.exit_code == 0 and len(res.stdout.splitlines()) == 3
    res = invoke("index", emb, "--factory", "PQ32")
    assert res.exit_code == 1 and "needs at least 256 vectors, the corpus has 120" in res.output


def test_cli_bad_input(corpus, tmp_path):
    emb = corpus / "emb"

    def fails(*args, match):
        res = invoke(*args)
        assert res.exit_code == 1, res.output
        assert match in res.output, res.output
        assert "Traceback" not in res.output

    fails("search", "   ", "--index", emb, match="empty query")
    fails("search", "perl", "--index", emb, "-k", 500, match="k=500 but the corpus has 120")
    fails("search", "perl", "--index", emb, "--mode", "tree", match="pass --matcher DIR")
    fails("search", "perl", "--index", emb, "--mode", "tree", "--matcher", corpus / "matcher", "-k", 15,
          match="k must be below 15")
    fails("search", "perl", "--index", corpus / "wide_emb", match="index.json: index file not found")
    fails("search", "perl", "--index", tmp_path / "nothing", match="embeddings folder not found")
    fails("search", "perl", "--index", emb, "--model", corpus / "other_lm",
          match=f"the query encoder {corpus / 'other_lm'} does not match the corpus embeddings")
    fails("search", "perl", "--index", corpus / "wide_emb", "--mode", "tree", "--matcher", corpus / "matcher",
          match=f"the matcher {corpus / 'matcher'} does not match the corpus embeddings in {corpus / 'wide_emb'}")

    # an index built from another model's embeddings is refused, whether the dim differs or only the model
    import shutil
    for other, match in (("wide_emb", "it was built from another model"),
                         ("other_emb", "index.json (rebuild it with `mixret index")):
        mixed = tmp_path / other
        shutil.copytree(corpus / other, mixed)
        for name in ("index.faiss", "index.json"):
            shutil.copy(emb / name, mixed / name)
        fails("search", "perl", "--index", mixed, match=match)

    long_query = "perl " * 40  # 200 bytes, context 64
    res = invoke("search", long_query, "--index", emb, "-k", 2)
    assert res.exit_code == 0, res.output
    assert "warning: 1 of 1 texts were longer than 64 tokens and were truncated" in res.stderr
    assert len(res.stdout.splitlines()) == 3
