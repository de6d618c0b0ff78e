"""BM25's k1, b and stemmer: the defaults rank exactly as BM25 did before they could be fitted; the fit picks by
validation R@1 then MRR@10 with ties to the defaults; finetune fits them on validation pairs only and saves them;
index copies them into the EMB_DIR, where search (bm25, fusion), serve and evaluate read them."""
import gzip
import itertools
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from mixret.cli import main
from mixret.data import Pair, bundled_pairs_path, split_pairs, write_pairs_jsonl
from mixret.errors import MixretError
from mixret.models import ModelConfig
from mixret.retrieval.bm25 import BM25_NAME, BM25Index, BM25Params, best_point, fit_bm25, load_bm25
from mixret.retrieval.search import Retriever
from mixret.training.finetune import FinetuneConfig, distinct_pairs, finetune, validation_slice
from mixret.training.loop import LoopConfig


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def todays_bm25(texts: list[str], queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """BM25 as mixret ranked before k1, b and the stemmer could be fitted: bm25s.BM25() with its own defaults over
    bm25s.tokenize with English stopwords and the Snowball stemmer, equal scores by corpus index
    -> (scores [Q, k], indices [Q, k])."""
    import bm25s
    import Stemmer
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    scores, indices = [], []
    for query in queries:
        tokens = bm25s.tokenize([query], stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)[0]
        known = [t for t in tokens if t in retriever.vocab_dict]
        s = retriever.get_scores(known).astype(np.float32) if known else np.zeros(len(texts), np.float32)
        order = np.lexsort((np.arange(len(texts)), -s))[:k]
        scores.append(s[order])
        indices.append(order)
    return np.array(scores), np.array(indices)


def bundled_head(n: int) -> list[Pair]:
    """The first n bundled pairs (without reading the whole file)."""
    with gzip.open(bundled_pairs_path(), "rt", encoding="utf-8") as f:
        return [Pair(r["id"], r["summary"], r["document"]) for r in map(json.loads, itertools.islice(f, n))]


def test_default_parameters_rank_exactly_as_before():
    pairs = bundled_head(80)
    texts, queries = [p.target for p in pairs], [p.query for p in pairs]
    ref_scores, ref_indices = todays_bm25(texts, queries, 10)
    runs = {"BM25Index()": BM25Index(texts).search(queries, 10),
            "BM25Params()": BM25Params().index(texts).search(queries, 10)}
    for name, retriever in (("no parameters", Retriever(None, texts)),
                            ("default parameters", Retriever(None, texts, bm25_params=BM25Params()))):
        res = retriever.search("bm25", 10, queries=queries)
        runs[name] = (res.scores, res.indices)
    for name, (scores, indices) in runs.items():
        np.testing.assert_array_equal(indices, ref_indices, err_msg=name)
        np.testing.assert_array_equal(scores, ref_scores, err_msg=name)
    # other parameters score otherwise: the comparison above would see a parameter that is not passed on
    for params in (BM25Params(k1=0.6), BM25Params(b=0.3), BM25Params(stemmer=False)):
        scores, _ = params.index(texts).search(queries, 10)
        assert not np.array_equal(scores, ref_scores), params
    # a matcher's bm25 feature keeps the default BM25 it was trained with
    tuned = Retriever(None, texts, bm25_params=BM25Params(k1=0.6, b=0.3, stemmer=False))
    assert (tuned.bm25.k1, tuned.bm25.b, tuned.bm25.stemmer is None) == (0.6, 0.3, True)
    assert (tuned.matcher_bm25.k1, tuned.matcher_bm25.b, tuned.matcher_bm25.stemmer is not None) == (1.5, 0.75, True)


# -- planted pairs: whether stemming helps depends on the pairs ---------------------------------

def roots(n: int, seed: int = 0) -> list[str]:
    """n made-up words whose -s and -ed forms the Snowball stemmer reduces to one distinct stem each."""
    import Stemmer
    stem = Stemmer.Stemmer("english").stemWord
    rng = np.random.default_rng(seed)
    found: dict[str, str] = {}
    while len(found) < n:
        r = "".join(rng.choice(list("bdfgklmnprstvz")) + rng.choice(list("aeiou")) for _ in range(3)) + "k"
        if stem(r + "s") == stem(r + "ed") and stem(r + "s") not in found.values():
            found[r] = stem(r + "s")
    return list(found)


def stemming_helps(ids: list[str], words: list[str]) -> list[Pair]:
    """Query "Xs", its document "Xed": only a stemmed BM25 matches them (R@1 1 stemmed, 0 not)."""
    return [Pair(i, f"the {w}s", f"{w}ed pad{i}") for i, w in zip(ids, words)]


def stemming_hurts(ids: list[str], words: list[str]) -> list[Pair]:
    """Query "Xs", its document "Xs" and the previous pair's document "Xed" (as long): stemmed, the two tie and the
    relevant one ranks second; unstemmed it is alone (R@1 0 stemmed, 1 not)."""
    return [Pair(i, f"the {w}s", f"{w}s {words[j - 1]}ed") for j, (i, w) in enumerate(zip(ids, words))]


def test_fit_picks_by_r1_then_mrr_and_ties_go_to_the_defaults():
    ids = [f"p{i}" for i in range(12)]
    words = roots(12)
    helps, hurts = stemming_helps(ids, words), stemming_hurts(ids, words)
    fitted = fit_bm25([p.query for p in helps], [p.target for p in helps], on="planted")
    assert fitted.values == (1.5, 0.75, True)            # every stemmed point has R@1 1: the defaults among them
    best = [r for r in fitted.fitted["results"] if r["r@1"] == 1.0]
    assert len(best) == 20 and all(r["stemmer"] for r in best)
    assert fitted.fitted["pairs"] == 12 and len(fitted.fitted["results"]) == 40
    fitted = fit_bm25([p.query for p in hurts], [p.target for p in hurts], on="planted")
    assert fitted.stemmer is False and fitted.values != BM25Params().values
    # R@1 tied (half each): MRR@10 decides; the stemmed ranks the other half second, the unstemmed last
    mixed = stemming_helps(ids[:6], words[:6]) + stemming_hurts(ids[6:], words[6:])
    fitted = fit_bm25([p.query for p in mixed], [p.target for p in mixed], on="planted")
    assert {(r["stemmer"], r["r@1"], r["mrr@10"]) for r in fitted.fitted["results"]} == {(True, 0.5, 0.75),
                                                                                       (False, 0.5, 0.5)}
    assert fitted.stemmer is True
    with pytest.raises(MixretError, match="at least 2 validation pairs"):
        fit_bm25(["q"], ["d"], on="one pair")


def test_best_point_takes_r1_then_mrr_then_the_defaults_then_the_first():
    def point(k1, b, stemmer, r1, mrr):
        return {"k1": k1, "b": b, "stemmer": stemmer, "r@1": r1, "mrr@10": mrr}
    first, default = point(0.6, 0.3, True, 0.5, 0.6), point(1.5, 0.75, True, 0.5, 0.6)
    higher_mrr, higher_r1 = point(0.9, 0.5, False, 0.5, 0.7), point(2.0, 0.9, False, 0.6, 0.61)
    assert best_point([first, default, higher_mrr, higher_r1]) == higher_r1
    assert best_point([first, default, higher_mrr]) == higher_mrr
    assert best_point([first, default]) == default
    assert best_point([first, point(0.9, 0.5, False, 0.5, 0.6)]) == first


def planted_roles(n: int, test_fraction: float, val_pairs: int) -> tuple[list[Pair], set[str], set[str]]:
    """n pairs where stemming hurts the validation slice (as finetune will draw it) and helps every training and
    test pair -> (pairs, validation ids, test ids)."""
    ids = [f"p{i}" for i in range(n)]
    placeholder = [Pair(i, f"query {i}", f"document {i}") for i in ids]
    train, test = split_pairs(placeholder, test_fraction)
    train, _ = distinct_pairs(train)
    _, val = validation_slice(train, min(val_pairs, len(train) // 5))
    val_ids, test_ids = {p.id for p in val}, {p.id for p in test}
    words = dict(zip(ids, roots(n, seed=1)))
    val_list = [i for i in ids if i in val_ids]
    by_id = {p.id: p for p in stemming_hurts(val_list, [words[i] for i in val_list])}
    rest = [i for i in ids if i not in val_ids]
    by_id.update({p.id: p for p in stemming_helps(rest, [words[i] for i in rest])})
    return [by_id[i] for i in ids], val_ids, test_ids


def test_fitted_on_validation_pairs_only_saved_and_read_by_index_search_serve_and_evaluate(tmp_path):
    """The validation slice wants no stemming, the training and test pairs want it: what finetune saves follows
    the validation slice. Then model folder -> index -> EMB_DIR -> search (bm25 with no model, fusion), serve
    and evaluate all use those parameters; a model without them leaves BM25 at its defaults, and says so."""
    pairs, val_ids, test_ids = planted_roles(200, 0.5, 32)
    path = tmp_path / "pairs.jsonl"
    write_pairs_jsonl(pairs, path)
    val = [p for p in pairs if p.id in val_ids]
    test = [p for p in pairs if p.id in test_ids]
    train = [p for p in pairs if p.id not in val_ids | test_ids]
    assert len(val) == 19 and len(test) > 60 and len(train) > 60
    model_dir = finetune(FinetuneConfig(
        pairs=str(path), test_fraction=0.5, init="masked-mixer", val_pairs=32, vocab_size=300, batch_size=16,
        model=ModelConfig(d_model=32, n_layers=1, context=16, mixing_init="mean"), out=str(tmp_path / "ft"),
        loop=LoopConfig(steps=2, lr=1e-3, eval_every=2, checkpoint_every=1000, progress=False)))

    # fitted on the validation slice: its best differs from what the training or the test pairs would give
    saved = load_bm25(model_dir)
    assert saved.stemmer is False and saved.fitted["pairs"] == 19
    assert saved.trained_on[0]["source"] == str(path.resolve()) and saved.trained_on[0]["test_fraction"] == 0.5
    on_val = fit_bm25([p.query for p in val], [p.target for p in val], on="the validation pairs")
    assert saved.values == on_val.values and saved.fitted["results"] == on_val.fitted["results"]
    for other in (test, train, train + val, val + test):
        assert fit_bm25([p.query for p in other], [p.target for p in other], on="other").stemmer is True

    # index copies them into the EMB_DIR, with the model they came from
    write_pairs_jsonl(test, tmp_path / "test.jsonl")
    emb_dir = tmp_path / "emb"
    res = invoke("embed", tmp_path / "test.jsonl", "--model", model_dir, "--field", "document", "--out", emb_dir)
    assert res.exit_code == 0, res.output
    res = invoke("index", emb_dir)
    assert res.exit_code == 0, res.output
    assert "stemmer off (fitted on 19 validation pairs" in res.output
    copied = load_bm25(emb_dir)
    assert copied.values == saved.values and copied.fitted == saved.fitted and copied.model["path"] == str(
        model_dir.resolve())

    # serve and fusion read them from the EMB_DIR
    from mixret.retrieval.search import load_corpus
    from mixret.serve import Searcher
    assert Searcher(emb_dir).info["bm25"]["stemmer"] is False
    assert load_corpus(emb_dir, ["fusion"], fusion_weight=0.0).retriever.bm25_params.values == saved.values

    def top(mode: str, query: str, *options, index=emb_dir) -> list[str]:
        res = invoke("search", query, "--index", index, "--mode", mode, "-k", 3, "--json", *options)
        assert res.exit_code == 0, res.output
        return [json.loads(line)["id"] for line in res.stdout.splitlines()]

    # stemming is what finds test documents: unstemmed, the query matches nothing and ties rank by corpus row
    query, gold = test[5].query, test[5].id
    ids = [p.id for p in test]
    assert BM25Params().index([p.target for p in test]).search([query], 1)[1][0, 0] == 5      # stemmed: found
    assert top("bm25", query) == ids[:3]
    assert top("fusion", query, "--fusion-weight", 0) == ids[:3]
    # bm25 search needs no model: the model folder moved away, it still answers with the same parameters
    moved = tmp_path / "moved"
    shutil.move(model_dir, moved)
    assert top("bm25", query) == ids[:3]
    shutil.move(moved, model_dir)

    # evaluate reads them from the model folder, with --mode bm25 too, and scores the test split only
    res = invoke("evaluate", "--pairs", path, "--mode", "bm25", "--model", model_dir, "--json")
    assert res.exit_code == 0, res.output
    assert f"stemmer off (fitted on 19 validation pairs of {path}), from {model_dir / BM25_NAME}" in res.stderr
    assert "scoring the test split" in res.stderr and "not used" not in res.stderr
    tuned = json.loads(res.stdout)
    assert tuned["bm25"] == {"k1": saved.k1, "b": saved.b, "stemmer": False, "fitted": True}
    assert tuned["n_queries"] == len(test) and tuned["modes"]["bm25"]["R@1"] == 0.0
    assert tuned["bm25_default"]["R@1"] == 1.0                    # beside it, the default BM25, compared with it
    assert tuned["bm25_default"]["vs_bm25"]["wins"] == len(test) and tuned["bm25_default"]["vs_bm25"]["losses"] == 0
    res = invoke("evaluate", "--pairs", path, "--mode", "bm25", "--test-fraction", 0.5, "--json")
    assert res.exit_code == 0, res.output
    assert "k1 1.5, b 0.75, stemmer on (defaults): no model folder given" in res.stderr
    assert json.loads(res.stdout)["modes"]["bm25"]["R@1"] == 1.0

    # a model folder without bm25.json (from before the fit): defaults everywhere, and index leaves none behind
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    (old / BM25_NAME).unlink()
    res = invoke("evaluate", "--pairs", path, "--mode", "bm25", "--model", old, "--test-fraction", 0.5)
    assert res.exit_code == 0 and f"(defaults): {old} has no {BM25_NAME}" in res.stderr
    assert "--model not used by mode bm25" in res.stderr
    old_emb = tmp_path / "old-emb"
    assert invoke("embed", tmp_path / "test.jsonl", "--model", old, "--field", "document", "--out",
                  old_emb).exit_code == 0
    shutil.copy(emb_dir / BM25_NAME, old_emb / BM25_NAME)          # a stale copy: index removes it
    res = invoke("index", old_emb)
    assert res.exit_code == 0 and "(defaults)" in res.output and not (old_emb / BM25_NAME).exists()
    assert top("bm25", query, index=old_emb)[0] == gold


def test_bad_bm25_json_is_refused_with_its_file(tmp_path):
    (tmp_path / BM25_NAME).write_text(json.dumps({"k1": -1, "b": 0.5, "stemmer": True}))
    with pytest.raises(MixretError, match=f"{tmp_path / BM25_NAME}: BM25 k1 must be a number >= 0"):
        load_bm25(tmp_path)
    (tmp_path / BM25_NAME).write_text("[1.2, 0.5]")
    with pytest.raises(MixretError, match=f"{tmp_path / BM25_NAME}: expected a JSON object with k1, b and stemmer"):
        load_bm25(tmp_path)
    (tmp_path / BM25_NAME).write_text(json.dumps({"k1": 1.2, "b": 0.5, "stem": True}))
    with pytest.raises(MixretError, match=r"unknown BM25 option\(s\) \['stem'\]"):
        load_bm25(tmp_path)
    from mixret.retrieval.bm25 import emb_dir_bm25
    (tmp_path / BM25_NAME).write_text(json.dumps({"k1": 1.2, "b": 0.5, "stemmer": True,
                                                  "model": {"path": "elsewhere", "hash": "abc"}}))
    with pytest.raises(MixretError, match="came from a model of weights hash abc, the embeddings from one of hash"):
        emb_dir_bm25(tmp_path, {"model_hash": "def"})
    (tmp_path / BM25_NAME).write_text(json.dumps({"k1": 1.2, "b": 0.5, "stemmer": True}))   # copied by hand
    with pytest.raises(MixretError, match="name no model they came from.*mixret index"):
        emb_dir_bm25(tmp_path, {"model_hash": "def"})
