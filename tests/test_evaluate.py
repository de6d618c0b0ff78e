import json
import math
import zlib

import numpy as np
import pytest
import torch

from mixret.data import Pair
from mixret.errors import MixretError
from mixret.evaluate import corpus_and_qrels, evaluate_pairs, format_table, ir_metrics, resolve_modes, run_from
from mixret.matcher import Matcher, MatcherConfig


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
    assert list(report["modes"]) == ["vector", "bm25", "tree", "hybrid"]
    assert report["n_queries"] == 40 and report["corpus_size"] == 60
    for mode in ("vector", "bm25"):  # the query's words are in its target: both find it nearly always
        assert report["modes"][mode]["R@1"] > 0.8
        assert report["modes"][mode]["passes_per_query"] is None
    assert report["modes"]["tree"]["passes_per_query"] == math.ceil((60 - 10) / (15 - 10))
    assert report["modes"]["hybrid"]["passes_per_query"] == math.ceil((30 - 10) / (15 - 10))
    for m in report["modes"].values():
        assert 0 <= m["R@1"] <= m["R@10"] <= 1 and m["queries_per_s"] > 0
    table = format_table(report)
    assert table.splitlines()[2].startswith("| mode | R@1 | R@10 | MRR@10 | nDCG@10 |")
    assert "| tree |" in table and "| chance | 0.017 | 0.167 |" in table


def test_evaluate_pairs_bad_input():
    with pytest.raises(MixretError, match="pass --matcher"):
        resolve_modes("tree", have_matcher=False)
    assert resolve_modes("all", have_matcher=False) == ["vector", "bm25"]
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
    """200 bundled pairs, an untrained tiny byte-level model and a matcher trained on it for one epoch."""
    import warnings

    from mixret.data import bundled_pairs_path, load_pairs, write_pairs_jsonl
    from mixret.models import ModelConfig, build_model
    from mixret.tokenizer import ByteTokenizer
    root = tmp_path_factory.mktemp("eval")
    write_pairs_jsonl(load_pairs(bundled_pairs_path())[:200], root / "pairs.jsonl")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=260, d_model=32, n_layers=2, context=64))
    model.save_pretrained(root / "lm", tokenizer=ByteTokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = invoke("train-matcher", "--pairs", root / "pairs.jsonl", "--model", root / "lm", "--context", 16,
                     "--epochs", 1, "--d-model", 32, "--layers", 1, "--out", root / "matcher")
    assert res.exit_code == 0, res.output
    return root


def test_cli_evaluate_all_modes(small_world):
    root = small_world
    res = invoke("evaluate", "--pairs", root / "pairs.jsonl", "--model", root / "lm", "--matcher", root / "matcher",
                 "--test-fraction", 1, "--limit", 50, "--shortlist", 40, "--out", root / "report.json")
    assert res.exit_code == 0, res.output
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["mode", "vector", "bm25", "tree", "hybrid",
                                                      "hybrid's shortlist, vector order", "chance"]
    report = json.loads((root / "report.json").read_text())
    assert report["shortlist_order"] == {m: report["modes"]["vector"][m] for m in report["shortlist_order"]}
    assert report["n_queries"] == 50 and report["corpus_size"] == 200 and report["matcher_context"] == 16
    assert report["modes"]["tree"]["passes_per_query"] == math.ceil((200 - 10) / (15 - 10))
    assert report["modes"]["hybrid"]["passes_per_query"] == math.ceil((40 - 10) / (15 - 10))
    assert report["modes"]["bm25"]["R@10"] > 5 * report["chance"]["R@10"]
    assert "warning:" in res.stderr  # the documents are longer than the tiny context

    res = invoke("evaluate", "--pairs", root / "pairs.jsonl", "--mode", "bm25", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert list(report["modes"]) == ["bm25"] and report["model"] is None
    assert report["n_queries"] == report["corpus_size"] < 200  # the held-out tenth


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
    assert set(report["modes"]) == {"vector", "fusion", "bm25", "tree", "hybrid"}
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
    assert set(report["modes"]) == {"vector", "bm25", "tree", "hybrid"} and report["n_queries"] > 50
    chance = report["chance"]
    for mode, m in report["modes"].items():
        assert m["R@1"] > 5 * chance["R@1"], (mode, m)
        assert m["R@10"] > 2 * chance["R@10"], (mode, m)
