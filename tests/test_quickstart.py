import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from planted import planted_pairs

from mixret.cli import main
from mixret.data import write_pairs_jsonl
from mixret.quickstart import side_by_side_threads

pytestmark = pytest.mark.slow

MODES = {"vector", "fusion", "hybrid", "tree", "bm25", "tfidf"}


def run_quickstart(tmp_path, monkeypatch, n_train: int, n_test: int, *options: str):
    """`mixret quickstart` on planted pairs (n_train training, n_test test) with small settings and `options`
    -> (its CliRunner result, its output folder, its results.json); the run must succeed."""
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))
    pairs = planted_pairs(n_train + n_test, n_words=30)
    write_pairs_jsonl(pairs[:n_train], tmp_path / "train.jsonl")
    write_pairs_jsonl(pairs[n_train:], tmp_path / "test.jsonl")
    out = tmp_path / "qs"
    res = CliRunner().invoke(main, ["quickstart", "--out", str(out), "--pairs", str(tmp_path / "train.jsonl"),
                                    "--test-pairs", str(tmp_path / "test.jsonl"), "--d-model", "32",
                                    "--context", "32", "--batch-size", "16", *options])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res, out, json.loads((out / "results.json").read_text())


def test_quickstart_runs_end_to_end_on_a_users_pairs(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    from st_models import tiny_st_model
    baseline = tiny_st_model(tmp_path / "st-tiny", [t for p in planted_pairs(320, n_words=30) for t in (p.query, p.target)])
    res, out, report = run_quickstart(tmp_path, monkeypatch, 260, 60, "--budget-minutes", "0.6", "--layers", "2",
                                      "--matcher-pairs", "200", "--matcher-epochs", "2", "--tree-queries", "5",
                                      "--baseline", str(baseline))
    assert set(report["models"]) == {"masked-mixer", "llama", "st:st-tiny"} and report["n_test"] == 60
    # the baseline: trained after the mixret models for the minutes and threads each had, scored like them
    st = report["models"].pop("st:st-tiny")
    mm = report["models"]["masked-mixer"]
    assert st["train_minutes"] == mm["train_minutes"] and st["finetune_steps"] >= 1
    assert st["finetune_seconds"] >= 60 * st["train_minutes"]
    assert set(st["eval"]["modes"]) == {"vector", "fusion", "bm25"} and st["eval"]["n_queries"] == 60
    assert st["bm25"] == mm["bm25"] and st["docs_per_s"] > 0 and mm["docs_per_s"] > 0
    assert "vs_bm25" in st["eval"]["modes"]["fusion"] and st["matcher"] is None
    assert 0.0 <= st["fusion"]["weight"] <= 1.0 and (Path(st["dir"]) / "modules.json").is_file()
    assert "| st:st-tiny | vector |" in (out / "results.md").read_text()
    assert "| st:st-tiny | fusion |" in res.output and "| st:st-tiny | tree |" not in res.output
    for arch, m in report["models"].items():
        assert set(m["eval"]["modes"]) == MODES
        assert m["eval"]["modes"]["tree"]["passes_per_query"] >= 1
        assert m["eval"]["n_queries"] == 60 and m["eval"]["corpus_size"] == 60
        for key in ("dir", "matcher_dir", "emb_dir"):
            assert Path(m[key]).exists()
        assert (out / "runs" / arch / "fusion.json").is_file()
        # BM25's parameters fitted with the model, copied beside its index, and the default BM25 beside them
        assert json.loads((Path(m["emb_dir"]) / "bm25.json").read_text())["fitted"]["pairs"] >= 2
        assert m["bm25"]["k1"] == json.loads((out / "runs" / arch / "bm25.json").read_text())["k1"]
        assert m["eval"]["bm25_default"]["R@1"] > 0.9
        # the two rare words shared by query and document make BM25 near perfect here; fusion, with a weight
        # fitted on validation pairs, must not lose what BM25 finds
        modes = m["eval"]["modes"]
        assert modes["bm25"]["R@1"] > 0.9 and modes["tfidf"]["R@1"] > 0.9 and "vs_bm25" in modes["tfidf"]
        assert modes["fusion"]["R@1"] >= modes["bm25"]["R@1"] - 0.05
    # one tokenizer, trained once before the two runs, is every model's
    tokenizer = json.loads((out / "data" / "tokenizer.json").read_text())
    for arch in report["models"]:
        assert json.loads((out / "runs" / arch / "tokenizer.json").read_text()) == tokenizer
    assert "training a BPE tokenizer" in res.output
    if side_by_side_threads():     # trained at the same time, each in its own process with its own log
        assert "side by side" in res.output
        for arch in report["models"]:
            log = (out / "logs" / f"{arch}.log").read_text()
            assert "budget:" in log and "training a BPE tokenizer" not in log
    # equal wall-clock: both archs got the same training budget
    minutes = {m["train_minutes"] for m in report["models"].values()}
    assert len(minutes) == 1
    md = (out / "results.md").read_text()
    assert "| masked-mixer | fusion |" in md and "| llama | tree |" in md
    assert "| - | bm25, fitted (k1 " in md and "| - | bm25, defaults |" in md and "vs fitted bm25" in md
    assert "| - | tfidf |" in md
    assert md.strip() in res.output.replace("\r", "")
    # the run ends with one example search (fusion, on the mixer's index) and its results
    tail = res.output[res.output.index("$ mixret search"):]
    assert "--mode fusion" in tail and "rank" in tail and "   1  " in tail


def test_quickstart_with_clm_pretraining_first(tmp_path, monkeypatch):
    _, out, report = run_quickstart(tmp_path, monkeypatch, 160, 40, "--budget-minutes", "0.5", "--pretrain-share",
                                    "0.4", "--layers", "1", "--matcher-pairs", "100", "--matcher-epochs", "1",
                                    "--tree-queries", "3")
    tokenizer = json.loads((out / "data" / "tokenizer.json").read_text())
    for arch, m in report["models"].items():
        saved = json.loads((Path(m["pretrain_dir"]) / "train_config.json").read_text())
        assert m["pretrain_steps"] == saved["steps"] >= 1 and m["finetune_steps"] >= 1
        # the CLM checkpoint is fine-tuned through the embedding head, the default that keeps it from collapsing
        assert m["pool_head"] and json.loads((Path(m["dir"]) / "config.json").read_text())["pool_head"] is True
        assert not json.loads((Path(m["pretrain_dir"]) / "config.json").read_text())["pool_head"]
        for run in (m["pretrain_dir"], m["dir"]):       # the CLM run and the fine-tuned model share the tokenizer
            assert json.loads((Path(run) / "tokenizer.json").read_text()) == tokenizer
    assert f"| {next(iter(report['models']))} | vector |" in (out / "results.md").read_text()
