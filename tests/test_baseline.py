"""The sentence-transformers baseline of quickstart: trained on exactly finetune's training pairs for its minutes on
its threads, its fusion weight fitted on finetune's validation slice, a row like the mixret models' in the table."""
import numpy as np
import pytest
import torch
from planted import planted_pairs

from mixret.data import write_pairs_jsonl
from mixret.distributed import Distributed
from mixret.quickstart import baseline_key, format_report
from mixret.retrieval.bm25 import BM25Params
from mixret.training.baseline import BaselineConfig, STEncoder, split, train_baseline
from mixret.training.finetune import FinetuneConfig, FinetuneTask
from mixret.training.loop import LoopConfig

pytest.importorskip("sentence_transformers")
from st_models import tiny_st_model  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))


def test_the_baseline_trains_on_finetunes_pairs_for_its_minutes_and_threads(tmp_path, monkeypatch):
    pairs = planted_pairs()
    path = tmp_path / "train.jsonl.gz"
    write_pairs_jsonl(pairs, path)
    model = tiny_st_model(tmp_path / "st", [t for p in pairs for t in (p.query, p.target)])
    cfg = BaselineConfig(model=str(model), pairs=str(path), out=str(tmp_path / "tuned"), minutes=0.05, threads=2,
                         batch_size=16, val_pairs=40)
    train, val = split(cfg)
    with Distributed.from_env() as dist:   # the pairs finetune trains and validates on, from the same file
        task = FinetuneTask(FinetuneConfig(pairs=str(path), test_fraction=0.0, val_pairs=40, batch_size=16,
                                           out=str(tmp_path / "ft"), tokenizer="bytes",
                                           loop=LoopConfig(steps=1)), dist)
    assert [p.id for p in train] == [p.id for p in task.train] and [p.id for p in val] == [p.id for p in task.val]
    threads_seen = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (threads_seen.append(torch.get_num_threads()),
                                                                          real_step(self, *a, **k))[1])
    before = torch.get_num_threads()
    facts = train_baseline(cfg, BM25Params(), echo=lambda line: None)
    assert before == 1 and set(threads_seen) == {2} and torch.get_num_threads() == before   # its threads, restored
    assert facts["finetune_steps"] == len(threads_seen) >= 2 and facts["finetune_seconds"] >= 3.0
    tuned = STEncoder.load(facts["dir"])
    untouched = STEncoder.load(str(model))
    texts = [p.query for p in val[:5]]
    assert not np.allclose(tuned.encode(texts), untouched.encode(texts))     # trained, and saved
    assert np.allclose(np.linalg.norm(tuned.encode(texts), axis=1), 1.0, atol=1e-5)
    fusion = facts["fusion_object"]
    assert fusion.fitted["on"].startswith("40 validation pairs") and 0 <= facts["val_r1"] <= 1


def test_the_baseline_row_sits_in_the_table_without_matcher_modes():
    row = {"R@1": 0.5, "R@10": 0.9, "MRR@10": 0.6, "nDCG@10": 0.7, "queries_per_s": 10.0, "passes_per_query": None,
           "vs_bm25": {"wins": 3, "losses": 1, "p": 0.6}}
    ev = {"n_queries": 10, "corpus_size": 10, "tree_queries": 3, "bm25_default": row,
          "modes": {m: row for m in ("vector", "fusion", "hybrid", "tree", "bm25")}}
    arch = {"train_minutes": 1.0, "params": 1000, "pooling": "last", "finetune_steps": 5, "finetune_seconds": 60,
            "val_r1": 0.5, "fusion": {"weight": 0.5, "method": "convex"}, "bm25": None, "docs_per_s": 250.0,
            "matcher": {"test_top1": 0.2}, "eval": ev}
    base = {**arch, "pooling": "sentence-transformers", "docs_per_s": 50.0, "matcher": None,
            "eval": {**ev, "modes": {m: row for m in ("vector", "fusion", "bm25")}}}
    key = baseline_key("/models/all-MiniLM-L6-v2/")
    assert key == "st:all-MiniLM-L6-v2"
    report = {"config": {"pretrain_share": 0.0}, "source": "s", "n_train": 100, "n_matcher_train": 50,
              "machine": "m", "chance": {"R@1": 0.1, "R@10": 1.0},
              "models": {"masked-mixer": arch, "llama": arch, key: base}}
    md = format_report(report)
    assert f"| {key} | vector |" in md and f"| {key} | fusion |" in md and f"| {key} | tree |" not in md
    assert "Baseline st:all-MiniLM-L6-v2: a pretrained sentence-transformers model" in md
    assert f"| {key} | 1,000 | sentence-transformers | - | 5 (60) | 0.500 | 0.50 (convex) | - | 50 |" in md
    assert "| masked-mixer | 1,000 | last | - | 5 (60) | 0.500 | 0.50 (convex) | 0.200 (0.032) | 250 |" in md
