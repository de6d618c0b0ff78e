"""What the commands do, the Python API does: finetune(FinetuneConfig), run_train_matcher(TrainMatcherConfig),
build_index(IndexConfig) and evaluate(EvaluateConfig), called without click, give what the commands give; and a
Retriever says which modes it can serve."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from mixret.cli import main
from mixret.options import replace_options
from mixret.retrieval.evaluate import EvaluateConfig, evaluate
from mixret.retrieval.fusion import Fusion
from mixret.retrieval.indexing import IndexConfig, build_index
from mixret.retrieval.search import MODES, RetrievalConfig, Retriever
from mixret.training.finetune import finetune, finetune_config
from mixret.training.matcher import TrainMatcherConfig, run_train_matcher

SAVED = Path(__file__).resolve().parent / "fixtures" / "folders-0.1.0"
TIMING = ("queries_per_s", "seconds", "corpus_embed_seconds", "query_embed_seconds")


def invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture()
def saved(tmp_path):
    shutil.copytree(SAVED, tmp_path / "saved")
    return tmp_path / "saved"


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


def test_finetune_from_python_is_the_command(tmp_path, saved):
    options = ["--pairs", saved / "pairs.jsonl", "--tokenizer", "bytes", "--d-model", "16", "--layers", "1",
               "--context", "32", "--steps", "3", "--val-pairs", "8", "--batch-size", "8", "--eval-every", "3"]
    invoke("finetune", *options, "--out", tmp_path / "cli")
    cfg = finetune_config({"pairs": str(saved / "pairs.jsonl"), "tokenizer": "bytes", "d_model": 16, "layers": 1,
                           "context": 32, "steps": 3, "val_pairs": 8, "batch_size": 8, "eval_every": 3,
                           "out": str(tmp_path / "py")})
    finetune(cfg)
    same_weights(tmp_path / "cli", tmp_path / "py")
    assert (tmp_path / "cli" / "fusion.json").read_text() == (tmp_path / "py" / "fusion.json").read_text()


def test_train_matcher_from_python_is_the_command(tmp_path, saved):
    args = dict(pairs=str(saved / "pairs.jsonl"), model=str(saved / "model"), context=11, epochs=1, d_model=16,
                layers=1, batch_size=16)
    invoke("train-matcher", *[x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)],
           "--out", tmp_path / "cli")
    out, metrics = run_train_matcher(replace_options(TrainMatcherConfig(), {**args, "out": str(tmp_path / "py")}))
    assert out == tmp_path / "py" and "test" in json.dumps(metrics)
    same_weights(tmp_path / "cli", tmp_path / "py")


def test_build_index_from_python_is_the_command(tmp_path, saved):
    for side in ("a", "b"):   # the embeddings' model is the fixture's copy: both copy its BM25 parameters
        shutil.copytree(saved / "emb", tmp_path / side)
        meta = json.loads((tmp_path / side / "meta.json").read_text())
        (tmp_path / side / "meta.json").write_text(json.dumps({**meta, "model_path": str(saved / "model")}))
    invoke("index", tmp_path / "a", "--factory", "Flat", "--metric", "l2")
    done = build_index(tmp_path / "b", IndexConfig(metric="l2"))
    assert done["index"].count == 81
    for name in ("index.2.json", "bm25.json", "meta.json"):
        a, b = json.loads((tmp_path / "a" / name).read_text()), json.loads((tmp_path / "b" / name).read_text())
        a.pop("updated_at", None), b.pop("updated_at", None)
        assert a == b, name
    assert json.loads((tmp_path / "a" / "bm25.json").read_text())["model"]["path"] == str(saved / "model")


def test_evaluate_from_python_is_the_command(tmp_path, saved):
    invoke("evaluate", "--pairs", saved / "pairs.jsonl", "--model", saved / "model", "--mode", "all", "--out",
           tmp_path / "cli.json")
    said = []
    report = evaluate(EvaluateConfig(pairs=str(saved / "pairs.jsonl"), mode="all",
                                     retrieval=RetrievalConfig(model=str(saved / "model"))), say=said.append)
    cli = json.loads((tmp_path / "cli.json").read_text())
    for mode, row in cli["modes"].items():
        assert {k: v for k, v in row.items() if k not in TIMING} == \
            {k: v for k, v in report["modes"][mode].items() if k not in TIMING}
    assert any("tree and hybrid skipped" in line for line in said)


def test_a_retriever_says_which_modes_it_serves():
    rng = np.random.default_rng(0)
    texts = [f"text number {i}" for i in range(8)]
    emb = rng.normal(size=(8, 4)).astype(np.float32)
    assert Retriever(None, texts).modes() == [m for m in MODES if m in ("bm25", "tfidf")]
    assert Retriever(emb, texts).modes() == [m for m in MODES if m in ("vector", "bm25", "tfidf")]
    r = Retriever(emb, texts, fusion=Fusion(0.5))
    assert "fusion" in r.modes() and "tree" not in r.modes()
    assert "matcher" in r.unavailable("hybrid")


def test_finetune_resumes_with_its_saved_options(tmp_path, saved):
    """`mixret finetune --out RUN --resume` alone continues the run with the options it was started with (lr,
    model size, tokenizer, ...) and ends with the weights of the uninterrupted run."""
    options = ["--pairs", saved / "pairs.jsonl", "--tokenizer", "bytes", "--d-model", "16", "--layers", "1",
               "--context", "32", "--steps", "4", "--val-pairs", "8", "--batch-size", "8", "--eval-every", "2",
               "--checkpoint-every", "2", "--lr", "0.003"]
    invoke("finetune", *options, "--out", tmp_path / "whole")
    assert "checkpoint written" in invoke("finetune", *options, "--stop-after", "2", "--out", tmp_path / "run")
    invoke("finetune", "--out", tmp_path / "run", "--resume")
    same_weights(tmp_path / "whole", tmp_path / "run")
