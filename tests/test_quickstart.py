import json

import pytest
from click.testing import CliRunner

from mixret.cli import main

pytestmark = pytest.mark.slow


def test_quickstart_runs_end_to_end_with_a_tiny_budget(tmp_path):
    out = tmp_path / "qs"
    res = CliRunner().invoke(main, ["quickstart", "--out", str(out), "--max-pairs", "300", "--budget-minutes",
                                    "0.2", "--d-model", "32", "--layers", "2", "--context", "64",
                                    "--matcher-epochs", "2", "--tree-queries", "5"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "results.json").read_text())
    assert set(report["models"]) == {"masked-mixer", "llama"}
    for arch, m in report["models"].items():
        assert set(m["eval"]["modes"]) == {"vector", "tree", "hybrid", "bm25"}
        for mode, r in m["eval"]["modes"].items():  # each query has one relevant document, so these order
            assert r["R@1"] <= r["MRR@10"] <= r["nDCG@10"] <= r["R@10"], (arch, mode, r)
        assert m["eval"]["modes"]["tree"]["passes_per_query"] >= 1
        assert (out / "runs" / arch / "model.safetensors").is_file()
        assert (out / "matchers" / arch / "model.safetensors").is_file()
        assert (out / "emb" / arch / "index.faiss").is_file()
        assert set(report["pooling"][arch]) == {"last", "eos", "mean"}
    # the same compute for both: steps, batch, context and size match
    assert report["models"]["masked-mixer"]["params"] == pytest.approx(report["models"]["llama"]["params"], rel=0.05)
    # BM25 shares words between Debian summaries and descriptions: far above chance even on this slice
    assert report["models"]["llama"]["eval"]["modes"]["bm25"]["R@1"] > 5 * report["chance"]["R@1"]
    md = (out / "results.md").read_text()
    assert "| masked-mixer | vector |" in md and "| llama | hybrid |" in md and "| - | bm25 |" in md
    assert md.strip() in res.output.replace("\r", "")
    # the run ends with one example search and its results
    tail = res.output[res.output.index("$ mixret search"):]
    assert "--mode hybrid" in tail and "rank" in tail and "   1  " in tail
