import json
import math
import zlib

import numpy as np
import pytest
import torch

from mixret.data import Pair
from mixret.errors import MixretError
from mixret.models.matcher import Matcher, MatcherConfig
from mixret.retrieval.evaluate import (
    corpus_and_qrels,
    evaluate_pairs,
    format_table,
    ir_metrics,
    paired_top1,
    resolve_modes,
    run_from,
)
from mixret.retrieval.fusion import Fusion


class BagOfWords:
    """A stand-in embedding model: hashed word counts, so a query shares dimensions with its target."""

    def __init__(self, dim: int = 64):
        self.dim = dim

    def encode(self, texts, batch_size=64, **kwargs):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        return out + 0.01


def test_ir_metrics_match_hand_computed_values():
    qrels = {"q1": {"a": 1}, "q2": {"c": 1}, "q3": {"z": 1}, "q4": {"b": 1}}
    run = {
        "q1": {"a": 3.0, "b": 2.0, "c": 1.0},                        # relevant at rank 1
        "q2": {"a": 3.0, "b": 2.0, "c": 1.0},                        # rank 3
        "q3": {f"d{i}": 20.0 - i for i in range(10)} | {"z": 0.5},   # rank 11: outside every cut-off
        "q4": {f"d{i}": 20.0 - i for i in range(9)} | {"b": 0.5},    # rank 10
    }
    m = ir_metrics(qrels, run)
    assert m["R@1"] == pytest.approx(1 / 4)
    assert m["R@10"] == pytest.approx(3 / 4)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 10) / 4)
    assert m["nDCG@10"] == pytest.approx((1 + 1 / math.log2(4) + 0 + 1 / math.log2(11)) / 4)
    # a query with no results scores zero rather than being dropped
    assert ir_metrics({"q1": {"a": 1}, "q2": {"b": 1}}, {"q1": {"a": 1.0}})["R@1"] == pytest.approx(0.5)


def test_run_from_keeps_our_order_despite_ties():
    run = run_from(np.array([[4, 2, -1], [0, 1, 2]]))
    assert run["q0"] == {"d4": 3.0, "d2": 2.0}
    m = ir_metrics({"q0": {"d2": 1}, "q1": {"d0": 1}}, run)
    assert m["MRR@10"] == pytest.approx((1 / 2 + 1) / 2)


def test_pessimistic_cut_puts_the_relevant_document_after_its_ties():
    from mixret.retrieval.tournament import pessimistic_cut
    idx = np.array([[7, 3, 5, 1],      # gold 3 ties with 5: goes after it
                    [3, 5, 1, 2],      # gold 3 ties with all, down to the one beyond the cut
                    [4, 3, 5, 1],      # gold 3 strictly between 4 and 5: stays
                    [9, 8, 7, 6],      # gold absent
                    [3, 2, -1, -1]])   # short list: gold ties with 2
    sc = np.array([[9., 5., 5., 1.], [2., 2., 2., 2.], [3., 2., 1., 0.], [4., 3., 2., 1.], [1., 1., 0., 0.]])
    out, scores = pessimistic_cut(idx, sc, np.array([3, 3, 3, 3, 3]), 3)
    np.testing.assert_array_equal(out, [[7, 5, 3], [5, 1, 2], [4, 3, 5], [9, 8, 7], [2, 3, -1]])
    np.testing.assert_array_equal(scores[0], [9., 5., 5.])


class Constant:
    """An embedding model that gives every text the same vector: every document ties with every other."""

    def encode(self, texts, batch_size=64, **kwargs):
        return np.ones((len(texts), 8), np.float32)


def constant_matcher(emb_dim: int, context: int) -> Matcher:
    """A matcher whose logit is the same for every candidate."""
    matcher = Matcher(MatcherConfig(emb_dim=emb_dim, d_model=16, n_layers=1, context=context)).eval()
    torch.nn.init.zeros_(matcher.head.weight)
    return matcher


def test_ties_never_count_for_the_relevant_document():
    """Constant scores find nothing in every mode (the search libraries' own order of equal scores would put
    some relevant documents first: FAISS returns the last rows first, the tournament and fusion the first)."""
    pairs = pairs_fixture(60)
    unrelated = [Pair(p.id, f"zz{i}", p.target) for i, p in enumerate(pairs)]  # BM25 scores all 0
    report = evaluate_pairs(unrelated, Constant(), constant_matcher(8, 16), "all", shortlist=30,
                            fusion=Fusion(weight=0.5))
    assert report["ties"] == "pessimistic"
    assert set(report["modes"]) == {"vector", "fusion", "bm25", "tfidf", "tree", "hybrid"}
    rrf = evaluate_pairs(unrelated, Constant(), None, "fusion", fusion=Fusion(weight=0.5, method="rrf"))
    for mode, m in [*report["modes"].items(), ("rrf fusion", rrf["modes"]["fusion"])]:
        assert m["R@1"] == m["R@10"] == m["MRR@10"] == m["nDCG@10"] == 0.0, mode
    # a single tie at the top: the relevant document ranks second, not first
    report = evaluate_pairs(pairs[:12], TieWithFirst(pairs[:12]), None, "vector")
    assert report["modes"]["vector"]["R@1"] == 0.0 and report["modes"]["vector"]["MRR@10"] == pytest.approx(0.5)


class TieWithFirst:
    """Query i's embedding is equally close to its target and to one other document, and far from the rest."""

    def __init__(self, pairs):
        self.queries = [p.query for p in pairs]
        self.targets = [p.target for p in pairs]

    def encode(self, texts, batch_size=64, **kwargs):
        n = len(self.targets)
        out = np.zeros((len(texts), 2 * n), np.float32)
        for r, t in enumerate(texts):
            if t in self.queries:
                i = self.queries.index(t)
                out[r, i] = out[r, n + (i + 1) % n] = 1.0
            else:
                j = self.targets.index(t)
                out[r, j] = out[r, n + j] = 1.0  # target j: cos = 1/2 with query j and with query j-1
        return out


def test_corpus_merges_repeated_targets():
    pairs = [Pair("1", "qa", "doc A"), Pair("2", "qb", "doc B"), Pair("3", "qc", "doc A")]
    queries, docs, qrels = corpus_and_qrels(pairs)
    assert queries == ["qa", "qb", "qc"] and docs == ["doc A", "doc B"]
    assert qrels == {"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d0": 1}}


def pairs_fixture(n=60):
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(400)]
    pairs = []
    for i in range(n):
        words = list(rng.choice(vocab, 12, replace=False))
        pairs.append(Pair(str(i), " ".join(words[:4]), " ".join(words)))
    return pairs


def test_evaluate_pairs_all_modes_and_table():
    torch.manual_seed(0)
    matcher = Matcher(MatcherConfig(emb_dim=64, d_model=32, n_layers=1, context=16)).eval()
    report = evaluate_pairs(pairs_fixture(), BagOfWords(), matcher, "all", shortlist=30, limit=40)
    assert list(report["modes"]) == ["vector", "bm25", "tfidf", "tree", "hybrid"]
    assert report["n_queries"] == 40 and report["corpus_size"] == 60
    for mode in ("vector", "bm25", "tfidf"):  # the query's words are in its target: each finds it nearly always
        assert report["modes"][mode]["R@1"] > 0.8
        assert report["modes"][mode]["passes_per_query"] is None
    assert report["modes"]["tree"]["passes_per_query"] == math.ceil((60 - 10) / (15 - 10))
    assert report["modes"]["hybrid"]["passes_per_query"] == math.ceil((30 - 10) / (15 - 10))
    for m in report["modes"].values():  # (tree and hybrid accuracy with a trained matcher: test_planted.py)
        assert m["queries_per_s"] > 0
    # the order the hybrid's shortlist came in is the vector mode's own ranking
    assert report["shortlist_order"] == {m: report["modes"]["vector"][m] for m in report["shortlist_order"]}
    assert "vs_bm25" not in report["modes"]["bm25"]
    for mode in ("vector", "tfidf", "tree", "hybrid"):  # each compared with BM25 query by query
        v = report["modes"][mode]["vs_bm25"]
        r1 = report["modes"][mode]["R@1"] - report["modes"]["bm25"]["R@1"]
        assert (v["wins"] - v["losses"]) / 40 == pytest.approx(r1) and 0 < v["p"] <= 1
    table = format_table(report)
    assert table.splitlines()[2].startswith("| mode | R@1 | R@10 | MRR@10 | nDCG@10 |")
    assert table.splitlines()[2].endswith("| top-1 vs bm25: won/lost (p) |")
    assert "| tree |" in table and "| chance | 0.017 | 0.167 |" in table
    v = report["modes"]["tree"]["vs_bm25"]
    assert f"| +{v['wins']}/-{v['losses']} (p " in table


def test_paired_top1_counts_disagreements_and_tests_them():
    a = np.array([True, True, True, False, False])
    b = np.array([False, False, True, True, False])
    assert paired_top1(a, b) == {"wins": 2, "losses": 1, "p": pytest.approx(1.0)}   # 2 of 3 is no evidence
    assert paired_top1(a, a) == {"wins": 0, "losses": 0, "p": 1.0}
    ten = paired_top1(np.ones(12, bool), np.arange(12) < 2)     # 10 wins, no loss: p = 2 / 2**10
    assert (ten["wins"], ten["losses"]) == (10, 0) and ten["p"] == pytest.approx(2 / 2**10)
    assert paired_top1(np.arange(12) < 2, np.ones(12, bool))["p"] == pytest.approx(ten["p"])  # two-sided


def test_repeated_queries_are_dropped_and_counted():
    pairs = pairs_fixture(30)
    repeated = pairs + [Pair("x1", pairs[3].query, "another document"), Pair("x2", pairs[7].query, "a third")]
    report = evaluate_pairs(repeated, None, None, "bm25")
    assert report["repeated_queries_dropped"] == 2
    assert report["n_queries"] == report["corpus_size"] == 30


def test_evaluate_pairs_bad_input():
    with pytest.raises(MixretError, match="pass --matcher"):
        resolve_modes("tree", have_matcher=False)
    assert resolve_modes("all", have_matcher=False) == ["vector", "bm25", "tfidf"]
    with pytest.raises(MixretError, match="unknown mode"):
        resolve_modes("exhaustive", have_matcher=True)
    with pytest.raises(MixretError, match="pass --model"):
        evaluate_pairs(pairs_fixture(), None, None, "vector")
    assert evaluate_pairs(pairs_fixture(), None, None, "bm25")["modes"]["bm25"]["R@1"] > 0.8
    with pytest.raises(MixretError, match="no pairs"):
        evaluate_pairs([], BagOfWords(), None, "vector")


# -- the command line ---------------------------------------------------------------------------

def invoke(*args):
    from click.testing import CliRunner

    from mixret.cli import main
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """200 bundled pairs, an untrained tiny byte-level model (trained on nothing) and a matcher trained on the
    training split of those pairs for one epoch; 100 other bundled pairs in a second file, held out from both."""
    import warnings

    from mixret.data import bundled_pairs_path, load_pairs, write_pairs_jsonl
    from mixret.models import ModelConfig, build_model
    from mixret.tokenizer import ByteTokenizer
    root = tmp_path_factory.mktemp("eval")
    bundled = load_pairs(bundled_pairs_path())
    write_pairs_jsonl(bundled[:200], root / "pairs.jsonl")
    write_pairs_jsonl(bundled[200:300], root / "heldout.jsonl")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=260, d_model=32, n_layers=2, context=64))
    model.trained_on = []
    model.save_pretrained(root / "lm", tokenizer=ByteTokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = invoke("train-matcher", "--pairs", root / "pairs.jsonl", "--model", root / "lm", "--context", 16,
                     "--epochs", 1, "--d-model", 32, "--layers", 1, "--out", root / "matcher")
    assert res.exit_code == 0, res.output
    return root


def test_cli_evaluate_scores_only_pairs_the_models_never_saw(small_world):
    from mixret.data import file_hash, load_pairs, split_pairs
    root = small_world
    trained = json.loads((root / "matcher" / "config.json").read_text())["trained_on"]
    assert trained == [{"source": str((root / "pairs.jsonl").resolve()), "hash": file_hash(root / "pairs.jsonl"),
                        "split": "train", "test_fraction": 0.1}]
    # the matcher's own pairs file: its test split only
    res = invoke("evaluate", "--pairs", root / "pairs.jsonl", "--model", root / "lm", "--matcher", root / "matcher",
                 "--shortlist", 40, "--out", root / "report.json")
    assert res.exit_code == 0, res.output
    _, test = split_pairs(load_pairs(root / "pairs.jsonl"), 0.1)
    assert f"scoring the test split of {root / 'pairs.jsonl'} (test fraction 0.1)" in res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["mode", "vector", "bm25", "tfidf", "tree", "hybrid",
                                                      "hybrid's shortlist, vector order", "chance"]
    report = json.loads((root / "report.json").read_text())
    n = len(test)
    assert report["test_fraction"] == 0.1 and report["n_queries"] == report["corpus_size"] == n < 40
    assert report["matcher_context"] == 16 and report["embeddings"]["pooling"] == "last"
    assert report["modes"]["tree"]["passes_per_query"] == math.ceil((n - 10) / (15 - 10))
    assert report["modes"]["bm25"]["R@1"] > 5 * report["chance"]["R@1"]
    assert report["shortlist_order"] == {m: report["modes"]["vector"][m] for m in report["shortlist_order"]}
    assert "warning:" in res.stderr  # the documents are longer than the tiny context

    # a file that trained neither the model nor the matcher: every pair
    res = invoke("evaluate", "--pairs", root / "heldout.jsonl", "--model", root / "lm", "--matcher",
                 root / "matcher", "--limit", 50, "--shortlist", 40, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["test_fraction"] is None and report["n_queries"] == 50 and report["corpus_size"] == 100
    assert "scoring every pair of" in res.stderr
    assert report["modes"]["tree"]["passes_per_query"] == math.ceil((100 - 10) / (15 - 10))
    assert report["modes"]["hybrid"]["passes_per_query"] == math.ceil((40 - 10) / (15 - 10))

    # asking for the pairs the matcher trained on is allowed, with a warning
    res = invoke("evaluate", "--pairs", root / "pairs.jsonl", "--model", root / "lm", "--matcher", root / "matcher",
                 "--mode", "tree", "--test-fraction", 0.5, "--limit", 5)
    assert res.exit_code == 0, res.output
    assert "warning: --test-fraction 0.5 scores pairs that matcher" in res.stderr


def test_cli_evaluate_bm25_ignores_model_and_matcher(small_world):
    """Options a mode does not use must not break it; BM25 is trained on nothing, so every pair is scored."""
    root = small_world
    res = invoke("evaluate", "--pairs", root / "pairs.jsonl", "--mode", "bm25", "--model", root / "lm",
                 "--matcher", root / "matcher", "--json")
    assert res.exit_code == 0, res.output
    assert "--model, --matcher not used by mode bm25" in res.stderr
    report = json.loads(res.stdout)
    assert list(report["modes"]) == ["bm25"] and report["model"] is None and report["matcher"] is None
    assert report["n_queries"] == report["corpus_size"] == 200 and report["test_fraction"] is None


def test_cli_evaluate_drops_repeated_queries(small_world, tmp_path):
    from mixret.data import Pair, load_pairs, write_pairs_jsonl
    pairs = load_pairs(small_world / "heldout.jsonl")
    write_pairs_jsonl(pairs + [Pair("again", pairs[0].query, "a different document")], tmp_path / "p.jsonl")
    res = invoke("evaluate", "--pairs", tmp_path / "p.jsonl", "--mode", "bm25", "--json")
    assert res.exit_code == 0, res.output
    assert "dropped 1 pairs repeating an earlier query" in res.stderr
    report = json.loads(res.stdout)
    assert report["repeated_queries_dropped"] == 1 and report["n_queries"] == 100


def test_cli_evaluate_refuses_a_matcher_of_other_embeddings(small_world):
    root = small_world
    res = invoke("evaluate", "--pairs", root / "heldout.jsonl", "--model", root / "lm", "--matcher",
                 root / "matcher", "--mode", "tree", "--pooling", "mean")
    assert res.exit_code == 1
    assert "pooling 'last' for the matcher" in res.output and "but 'mean' for the embeddings asked for" in res.output


def test_cli_evaluate_fusion_and_a_matcher_with_score_features(small_world, tmp_path):
    """A model folder with fusion.json adds fusion to --mode all (weight 0: BM25's ranking); a matcher trained
    with --features bm25,cosine records them and ranks a BM25 shortlist, reported beside the shortlist's order."""
    import shutil
    root = small_world
    shutil.copytree(root / "lm", tmp_path / "lm")
    (tmp_path / "lm" / "fusion.json").write_text(json.dumps({"weight": 0.0, "method": "convex", "depth": 20}))
    res = invoke("train-matcher", "--pairs", root / "pairs.jsonl", "--model", tmp_path / "lm", "--context", 16,
                 "--epochs", 1, "--d-model", 32, "--layers", 1, "--features", "bm25,cosine", "--hard-negatives", 4,
                 "--out", tmp_path / "matcher")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "matcher" / "config.json").read_text())["features"] == ["bm25", "cosine"]
    res = invoke("evaluate", "--pairs", root / "pairs.jsonl", "--model", tmp_path / "lm", "--matcher",
                 tmp_path / "matcher", "--test-fraction", 1, "--limit", 50, "--shortlist", 40, "--shortlist-from",
                 "bm25", "--out", tmp_path / "report.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["modes"]) == {"vector", "fusion", "bm25", "tfidf", "tree", "hybrid"}
    assert report["modes"]["fusion"]["R@1"] == report["modes"]["bm25"]["R@1"]
    assert report["shortlist_order"] == {m: report["modes"]["bm25"][m] for m in report["shortlist_order"]}
    assert "| hybrid's shortlist, bm25 order |" in res.stdout
    res = invoke("train-matcher", "--pairs", root / "pairs.jsonl", "--model", tmp_path / "lm", "--context", 16,
                 "--features", "tfidf", "--out", tmp_path / "bad")
    assert res.exit_code == 1 and "features" in res.output


def test_cli_evaluate_bad_input(small_world, tmp_path):
    root = small_world
    res = invoke("evaluate", "--pairs", root / "pairs.jsonl", "--model", root / "lm", "--mode", "tree")
    assert res.exit_code == 1 and "pass --matcher DIR" in res.output
    res = invoke("evaluate", "--pairs", tmp_path / "none.jsonl", "--mode", "bm25")
    assert res.exit_code == 1 and "none.jsonl: file not found" in res.output
    res = invoke("evaluate", "--pairs", root / "pairs.jsonl", "--mode", "bm25", "--test-fraction", 0)
    assert res.exit_code == 1 and "no pairs in the held-out split" in res.output


@pytest.mark.slow
def test_whole_pipeline_through_the_cli(tmp_path):
    """1000 bundled pairs: pretrain a tiny model, embed both sides, train a matcher, index, search,
    evaluate; every mode must rank far above chance on the held-out pairs."""
    from mixret.data import bundled_pairs_path, load_pairs, write_pairs_jsonl
    pairs = load_pairs(bundled_pairs_path())[:1000]
    write_pairs_jsonl(pairs, tmp_path / "pairs.jsonl")

    def ok(*args):
        res = invoke(*args)
        assert res.exit_code == 0, res.output
        return res

    ok("pretrain", "--data", tmp_path / "pairs.jsonl", "--text-field", "summary", "--text-field", "document",
       "--tokenizer", "bpe", "--vocab-size", 1024, "--d-model", 64, "--layers", 2, "--context", 64,
       "--steps", 200, "--eval-every", 1000, "--out", tmp_path / "lm")
    for field in ("summary", "document"):
        ok("embed", tmp_path / "pairs.jsonl", "--model", tmp_path / "lm", "--field", field, "--pooling", "mean",
           "--out", tmp_path / f"emb-{field}")
    ok("train-matcher", "--pairs", tmp_path / "pairs.jsonl", "--query-emb", tmp_path / "emb-summary",
       "--target-emb", tmp_path / "emb-document", "--context", 16, "--epochs", 10, "--d-model", 64, "--layers", 2,
       "--out", tmp_path / "matcher")
    ok("index", tmp_path / "emb-document")

    docs = tmp_path / "emb-document"
    res = ok("search", pairs[5].target, "--index", docs, "--json")  # the model comes from the EMB_DIR's meta.json
    hits = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(hits) == 10 and hits[0]["id"] == pairs[5].id
    for mode in ("tree", "hybrid"):
        res = ok("search", pairs[5].query, "--index", docs, "--mode", mode, "--matcher", tmp_path / "matcher")
        assert len(res.stdout.splitlines()) == 11 and "matcher forward passes" in res.stderr

    ok("evaluate", "--pairs", tmp_path / "pairs.jsonl", "--model", tmp_path / "lm", "--matcher", tmp_path / "matcher",
       "--pooling", "mean", "--shortlist", 30, "--out", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["modes"]) == {"vector", "bm25", "tfidf", "tree", "hybrid"} and report["n_queries"] > 50
    chance = report["chance"]
    for mode, m in report["modes"].items():
        assert m["R@1"] > 5 * chance["R@1"], (mode, m)
        assert m["R@10"] > 2 * chance["R@10"], (mode, m)


def test_held_out_split_follows_what_trained_the_models(tmp_path):
    from mixret.data import file_hash
    from mixret.retrieval.evaluate import held_out_split
    pairs, other = tmp_path / "pairs.jsonl", tmp_path / "other.jsonl"
    pairs.write_text('{"id": 1, "summary": "a", "document": "b"}\n')
    other.write_text('{"id": 2, "summary": "c", "document": "d"}\n')

    def record(path, split, fraction=None):
        return [{"source": str(path), "hash": file_hash(path), "split": split,
                 **({"test_fraction": fraction} if fraction is not None else {})}]

    assert held_out_split(pairs, {})[0] is None  # bm25 only: nothing trained
    fraction, which, warns = held_out_split(pairs, {"model m": record(other, "all")})
    assert fraction is None and which.startswith("every pair of") and not warns
    fraction, which, _ = held_out_split(pairs, {"model m": record(other, "all"),
                                                "matcher x": record(pairs, "train", 0.2),
                                                "matcher y": record(pairs, "train", 0.1)})
    assert fraction == 0.1 and "matcher x, matcher y trained on the rest of it" in which
    fraction, which, _ = held_out_split(pairs, {"model m": None, "matcher x": record(other, "train", 0.1)})
    assert fraction == 0.1 and "model m records no training data" in which
    fraction, _, warns = held_out_split(pairs, {"model m": record(pairs, "all")})
    assert warns == [f"model m was trained on every pair of {pairs}: no pair of it is held out from it, so its "
                     "scores here measure text it has seen"]
    fraction, _, warns = held_out_split(pairs, {"matcher x": record(pairs, "train", 0.1)}, test_fraction=1.0)
    assert fraction == 1.0 and warns == ["--test-fraction 1 scores pairs that matcher x (test fraction 0.1) trained on"]
