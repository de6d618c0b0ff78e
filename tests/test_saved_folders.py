"""Folders written by mixret 0.1.0 before its modules moved into floors (tests/fixtures/folders-0.1.0: a fine-tuned
model with fusion.json and bm25.json, an embeddings folder updated once by `index --add` (version 1), a matcher)
still load, and search and evaluate give what that version gave (expected-*.json, written by it)."""
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from close import assert_close

import mixret
from mixret.cli import main

SAVED = Path(__file__).resolve().parent / "fixtures" / "folders-0.1.0"
METRICS = ("R@1", "R@10", "MRR@10", "nDCG@10")


@pytest.fixture()
def saved(tmp_path):
    shutil.copytree(SAVED, tmp_path / "saved")
    return tmp_path / "saved"


def invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_the_model_loads_with_its_embedding_settings(saved):
    model = mixret.load(saved / "model")
    assert model.config.d_model == 16 and model.embedding_defaults["pooling"] == "last"
    assert model.encode(["alpha beta"]).shape == (1, 16)


@pytest.mark.parametrize("mode", ["vector", "fusion", "bm25", "tree", "hybrid"])
def test_search_answers_as_before(saved, mode):
    out = invoke("search", "alpha beta", "--index", saved / "emb", "--model", saved / "model", "--matcher",
                 saved / "matcher", "--mode", mode, "-k", 5, "--json")
    hits = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    expected = [json.loads(line) for line in (SAVED / f"expected-{mode}.json").read_text().splitlines()]
    assert [h["id"] for h in hits] == [e["id"] for e in expected]
    assert_close([h["score"] for h in hits], [e["score"] for e in expected])


def test_evaluate_scores_as_before(saved, tmp_path):
    invoke("evaluate", "--pairs", saved / "pairs.jsonl", "--model", saved / "model", "--matcher", saved / "matcher",
           "--mode", "all", "--out", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    expected = json.loads((SAVED / "expected-evaluate.json").read_text())
    assert set(report["modes"]) == set(expected["modes"]) | {"tfidf"}   # tfidf came after 0.1.0
    for mode, row in expected["modes"].items():
        assert {k: report["modes"][mode][k] for k in METRICS} == pytest.approx({k: row[k] for k in METRICS}), mode
