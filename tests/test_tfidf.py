"""TF-IDF (mixret.retrieval.tfidf), the second lexical baseline: scikit-learn's vectors ranked by cosine, in search,
evaluate (ties pessimistic, in --mode all), serve's writes and quickstart's table."""
import json
import math
import shutil

import numpy as np
import pytest
from test_search import corpus, invoke  # noqa: F401  (corpus is a fixture)

from mixret.data import Pair, bundled_pairs_path, load_pairs
from mixret.errors import MixretError
from mixret.retrieval.evaluate import evaluate_pairs, resolve_modes
from mixret.retrieval.search import MODES, Retriever
from mixret.retrieval.tfidf import Analyzer, TfidfIndex


def bundled_texts(n=200):
    return [p.target for p in load_pairs(bundled_pairs_path())[:n]]


# -- the index ----------------------------------------------------------------------------------

def test_a_planted_document_ranks_first():
    """A query sharing two rare words with exactly one document finds it first, among 200 real documents."""
    texts = bundled_texts()
    texts[137] += " The quokka plays the harpsichord."
    index = TfidfIndex(texts)
    scores, idx = index.search(["harpsichord for a quokka", "quokkas playing harpsichords"], 5)
    assert idx[0, 0] == 137 and idx[1, 0] == 137        # stemmed: "quokkas" is "quokka"
    assert scores[0, 0] > 0 and scores[0, 1] == 0       # no other text holds either word
    assert scores.dtype == np.float32 and idx.dtype == np.int64


def test_scores_are_a_hand_computed_sublinear_tfidf_cosine():
    """idf = ln((1 + n) / (1 + df)) + 1, weight (1 + ln tf) * idf, unit vectors, dot product; stop words dropped."""
    texts = ["apple banana apple", "banana cherry", "cherry date date date the", "of and the"]
    n = len(texts)
    df = {"apple": 1, "banana": 2, "cherry": 2, "date": 1}
    idf = {w: math.log((1 + n) / (1 + d)) + 1 for w, d in df.items()}

    def unit(counts):
        v = {w: (1 + math.log(c)) * idf[w] for w, c in counts.items() if w in idf}
        norm = math.sqrt(sum(x * x for x in v.values()))
        return {w: x / norm for w, x in v.items()} if norm else {}

    docs = [unit({"apple": 2, "banana": 1}), unit({"banana": 1, "cherry": 1}), unit({"cherry": 1, "date": 3}), {}]
    query = unit({"apple": 1, "cherry": 1, "kiwi": 1})           # kiwi: in no text, ignored
    expected = [sum(query.get(w, 0.0) * x for w, x in d.items()) for d in docs]
    index = TfidfIndex(texts)
    np.testing.assert_allclose(index.scores("Apple, the cherry and a kiwi"), expected, rtol=1e-6, atol=1e-7)
    assert expected[0] > expected[1] > 0 and expected[3] == 0
    assert list(index.search(["apple cherry kiwi"], 4)[1][0]) == [0, 1, 2, 3]


@pytest.mark.parametrize("stemmer", [True, False])
def test_the_vectors_are_scikit_learns(stemmer):
    """The cosines are those of scikit-learn's TfidfVectorizer (sublinear tf, English stop words; without the
    stemmer its default word analyzer exactly) on real text."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    texts = bundled_texts()
    queries = [" ".join(t.split()[:6]) for t in texts[::17]] + ["Perl bindings for OpenLDAP", "the", "zzzz"]
    if stemmer:
        vectorizer = TfidfVectorizer(analyzer=Analyzer(), sublinear_tf=True)
    else:
        vectorizer = TfidfVectorizer(lowercase=True, stop_words="english", sublinear_tf=True)
    expected = (vectorizer.fit_transform(texts) @ vectorizer.transform(queries).T).T.toarray()
    index = TfidfIndex(texts, stemmer=stemmer)
    assert index.terms == list(vectorizer.get_feature_names_out())
    np.testing.assert_allclose(index.score_matrix(queries), expected, rtol=1e-6, atol=1e-7)


def test_equal_scores_are_ranked_by_corpus_index_and_bad_input_is_refused():
    index = TfidfIndex(["red blue", "red green", "yellow", "the of and"])
    scores, idx = index.search(["red", "of the", "purple"], 4)
    assert list(idx[0]) == [0, 1, 2, 3] and scores[0, 0] == scores[0, 1] > 0
    assert list(idx[1]) == list(idx[2]) == [0, 1, 2, 3] and (scores[1:] == 0).all()
    with pytest.raises(MixretError, match="corpus size 4"):
        index.search(["red"], 5)
    with pytest.raises(MixretError, match="empty corpus"):
        TfidfIndex([])
    only_stop_words = TfidfIndex(["the", "of and"])      # no word at all: every score 0
    assert only_stop_words.search(["the red"], 2)[0].tolist() == [[0.0, 0.0]]


def test_the_index_follows_writes_with_the_scores_of_a_fresh_index():
    """The TF-IDF serve keeps (term counts, updated after each write) scores every text exactly as one built from
    the texts of that moment, words that left the corpus gone from it."""
    texts = bundled_texts(300) + ["the of and", "zebra"]
    kept = TfidfIndex(texts, keep_terms=True)
    queries = [" ".join(t.split()[:4]) for t in texts[::25]] + ["zebra", "the", "zebra perl library", "harpsichord"]
    corpus_now = texts[:10] + texts[20:] + ["a zebra library", "perl perl perl harpsichord"]
    corpus_now[5] = "a new text for row five"
    keep = np.r_[np.arange(10), np.full(10, -1), np.arange(10, len(texts) - 10)]
    keep[5] = -1
    updated = kept.updated(keep, corpus_now, np.array([5, len(corpus_now) - 2, len(corpus_now) - 1]))
    assert kept.count == len(texts) and updated.count == len(corpus_now)
    for index, now in ((kept, texts), (updated, corpus_now)):
        fresh = TfidfIndex(now)
        assert index.terms == fresh.terms
        np.testing.assert_array_equal(index.score_matrix(queries), fresh.score_matrix(queries))
        np.testing.assert_array_equal(index.search(queries, 10)[1], fresh.search(queries, 10)[1])
    again = updated.updated(np.r_[np.arange(len(corpus_now) - 1), -1], corpus_now[:-1], np.zeros(0, np.int64))
    assert "harpsichord" not in again.vocabulary and "harpsichord" in updated.vocabulary
    np.testing.assert_array_equal(again.score_matrix(queries), TfidfIndex(corpus_now[:-1]).score_matrix(queries))
    with pytest.raises(MixretError, match="without keep_terms"):
        TfidfIndex(texts).updated(keep, corpus_now, np.array([5]))


# -- search and evaluate ------------------------------------------------------------------------

def test_the_retriever_searches_tfidf_without_embeddings():
    texts = bundled_texts(50)
    r = Retriever(None, texts)
    assert "tfidf" in MODES
    res = r.search("tfidf", 3, queries=[texts[7], texts[31]])
    assert list(res.indices[:, 0]) == [7, 31] and (res.passes == 0).all()
    np.testing.assert_array_equal(res.scores, TfidfIndex(texts).search([texts[7], texts[31]], 3)[0])
    with pytest.raises(MixretError, match="need the query texts"):
        r.search("tfidf", 3)


def test_ties_are_pessimistic():
    """Equal scores never count for the relevant document: queries sharing no word with any document (all scores
    0) find nothing, and a relevant document tied with another ranks after it."""
    pairs = [Pair(str(i), f"zz{i}", t) for i, t in enumerate(bundled_texts(30))]
    report = evaluate_pairs(pairs, None, None, "tfidf")
    m = report["modes"]["tfidf"]
    assert m["R@1"] == m["R@10"] == m["MRR@10"] == m["nDCG@10"] == 0.0
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    stop = sorted(ENGLISH_STOP_WORDS)               # queries of stop words only: empty vectors
    empty = [Pair(str(i), f"{stop[i]} {stop[i + 30]}", t) for i, t in enumerate(bundled_texts(30))]
    report = evaluate_pairs(empty, None, None, "tfidf")
    assert report["n_queries"] == report["corpus_size"] == 30 and report["modes"]["tfidf"]["R@10"] == 0.0
    # "red" scores "red blue" and "red green" alike (blue and green each in one text): the relevant one, first
    # by corpus index, ranks second
    tied = [Pair("0", "red", "red blue"), Pair("1", "green yellow", "red green"), Pair("2", "black", "black white")]
    m = evaluate_pairs(tied, None, None, "tfidf")["modes"]["tfidf"]
    assert m["R@1"] == pytest.approx(2 / 3) and m["MRR@10"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_evaluate_all_includes_tfidf_compared_with_bm25():
    assert resolve_modes("all", have_matcher=False) == ["vector", "bm25", "tfidf"]
    assert "tfidf" in resolve_modes("all", have_matcher=True, have_fusion=True)
    pairs = [Pair(str(i), " ".join(t.split()[:8]), t) for i, t in enumerate(bundled_texts(60))]
    report = evaluate_pairs(pairs, None, None, ["bm25", "tfidf"])
    assert list(report["modes"]) == ["bm25", "tfidf"] and report["modes"]["tfidf"]["R@1"] > 0.5
    v, r1 = report["modes"]["tfidf"]["vs_bm25"], report["modes"]["tfidf"]["R@1"] - report["modes"]["bm25"]["R@1"]
    assert (v["wins"] - v["losses"]) / 60 == pytest.approx(r1)
    assert report["modes"]["tfidf"]["queries_per_s"] > 0 and report["modes"]["tfidf"]["passes_per_query"] is None


# -- the command line ---------------------------------------------------------------------------

def test_cli_search_tfidf_needs_no_model(corpus, tmp_path):  # noqa: F811
    from mixret.retrieval.embeddings import load_emb_dir
    emb = tmp_path / "emb"
    shutil.copytree(corpus / "emb", emb)
    res = invoke("search", "OpenLDAP perl", "--index", emb, "--mode", "tfidf", "-k", 5, "--json",
                 "--model", tmp_path / "no-model")   # not loaded: tfidf searches the texts alone
    assert res.exit_code == 0, res.output
    hits = [json.loads(line) for line in res.stdout.splitlines()]
    assert hits[0]["id"] == "libnet-ldapapi-perl" and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    _, ids, texts, _ = load_emb_dir(emb)
    scores, idx = TfidfIndex(texts).search(["OpenLDAP perl"], 5)
    assert [h["id"] for h in hits] == [ids[i] for i in idx[0]]
    np.testing.assert_allclose([h["score"] for h in hits], scores[0], rtol=1e-6)
    res = invoke("search", "OpenLDAP perl", "--index", emb, "--mode", "tfidf", "-k", 3)
    assert res.exit_code == 0 and res.stdout.splitlines()[1].split()[:2] == ["1", "libnet-ldapapi-perl"]


def test_cli_evaluate_tfidf_and_all(corpus, tmp_path):  # noqa: F811
    res = invoke("evaluate", "--pairs", corpus / "pairs.jsonl", "--mode", "tfidf", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert list(report["modes"]) == ["tfidf"] and report["model"] is None and report["bm25"] is None
    assert report["n_queries"] == report["corpus_size"] == 120 and report["test_fraction"] is None
    assert report["modes"]["tfidf"]["R@1"] > 10 * report["chance"]["R@1"]
    res = invoke("evaluate", "--pairs", corpus / "pairs.jsonl", "--model", corpus / "lm", "--mode", "all",
                 "--test-fraction", 1, "--limit", 40, "--out", tmp_path / "report.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["modes"]) == {"vector", "bm25", "tfidf"}
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["mode", "vector", "bm25", "tfidf", "chance"]
    v = report["modes"]["tfidf"]["vs_bm25"]
    assert f"| +{v['wins']}/-{v['losses']} (p " in rows[3]


# -- quickstart's table -------------------------------------------------------------------------

def test_quickstart_table_has_a_tfidf_row_beside_bm25():
    from mixret.quickstart import format_report
    row = {"R@1": 0.5, "R@10": 0.9, "MRR@10": 0.6, "nDCG@10": 0.7, "queries_per_s": 10.0, "passes_per_query": None,
           "vs_bm25": {"wins": 3, "losses": 1, "p": 0.6}}
    tfidf = {**row, "R@1": 0.25, "vs_bm25": {"wins": 2, "losses": 7, "p": 0.18}}
    ev = {"n_queries": 10, "corpus_size": 10, "tree_queries": 3, "bm25_default": row,
          "modes": {**{m: row for m in ("vector", "fusion", "hybrid", "tree", "bm25")}, "tfidf": tfidf}}
    arch = {"train_minutes": 1.0, "params": 1000, "pooling": "last", "finetune_steps": 5, "finetune_seconds": 60,
            "val_r1": 0.5, "fusion": {"weight": 0.5, "method": "convex"}, "bm25": None, "docs_per_s": 250.0,
            "matcher": {"test_top1": 0.2}, "eval": ev}
    report = {"config": {"pretrain_share": 0.0}, "source": "s", "n_train": 100, "n_matcher_train": 50,
              "machine": "m", "chance": {"R@1": 0.1, "R@10": 1.0}, "models": {"masked-mixer": arch, "llama": arch}}
    lines = format_report(report).splitlines()
    rows = [line for line in lines if "| tfidf |" in line]
    assert rows == ["| - | tfidf | 0.250 | 0.900 | 0.600 | 0.700 | 10.0 | - | +2/-7 (p 0.18) |"]
    assert lines.index(rows[0]) == next(i for i, line in enumerate(lines) if "| bm25, defaults |" in line) + 1
