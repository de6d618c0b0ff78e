"""What made an embedding travels with it: model hash, pooling and max_length are recorded in meta.json,
index.json and a matcher's config.json, and search, evaluate, embed and train-matcher refuse mixing
embeddings made differently, naming both values."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mixret import io
from mixret.cli import main
from mixret.errors import MixretError
from mixret.models import ModelConfig, build_model
from mixret.models.encode import EmbeddingSpec, encode, resolve_spec
from mixret.retrieval.embeddings import load_emb_dir
from mixret.tokenizer import ByteTokenizer


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # texts longer than the tiny context
        res = invoke(*args)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model; 60 bundled pairs embedded by it with last pooling over 64 tokens, with mean pooling, and
    with last pooling over 16 tokens; a Flat index on each; matchers on the last-64 and mean embeddings."""
    from mixret.data import bundled_pairs_path, load_pairs, write_pairs_jsonl
    root = tmp_path_factory.mktemp("provenance")
    write_pairs_jsonl(load_pairs(bundled_pairs_path())[:60], root / "pairs.jsonl")
    torch.manual_seed(0)
    build_model(ModelConfig(vocab_size=260, d_model=32, n_layers=2, context=64)).save_pretrained(
        root / "lm", tokenizer=ByteTokenizer())
    for name, opts in (("last", []), ("mean", ["--pooling", "mean"]), ("short", ["--max-length", 16])):
        for field in ("summary", "document"):
            ok("embed", root / "pairs.jsonl", "--model", root / "lm", "--field", field, "--out",
               root / f"{name}-{field}", *opts)
        ok("index", root / f"{name}-document")
    for name in ("last", "mean"):
        ok("train-matcher", "--pairs", root / "pairs.jsonl", "--query-emb", root / f"{name}-summary", "--target-emb",
           root / f"{name}-document", "--context", 8, "--epochs", 1, "--d-model", 16, "--layers", 1,
           "--test-fraction", 0.3, "--out", root / f"matcher-{name}")
    return root


def test_spec_is_recorded_everywhere(world):
    model_hash = io.file_hash(world / "lm" / "model.safetensors")
    for name, spec in (("last", (model_hash, "last", 64)), ("mean", (model_hash, "mean", 64)),
                       ("short", (model_hash, "last", 16))):
        meta = json.loads((world / f"{name}-document" / "meta.json").read_text())
        index = json.loads((world / f"{name}-document" / "index.json").read_text())
        assert EmbeddingSpec.of(meta) == EmbeddingSpec.of(index) == EmbeddingSpec(*spec)
    for name in ("last", "mean"):
        config = json.loads((world / f"matcher-{name}" / "config.json").read_text())
        assert EmbeddingSpec.of(config) == EmbeddingSpec(model_hash, name, 64)


def test_check_names_both_values():
    a, b = EmbeddingSpec("h1", "last", 64), EmbeddingSpec("h1", "mean", 32)
    a.check(EmbeddingSpec("h1", None, None), "A", "B")  # what is not recorded is not compared
    with pytest.raises(MixretError, match=r"B does not match A: pooling 'last' for A but 'mean' for B; "
                                          r"max_length 64 for A but 32 for B"):
        a.check(b, "A", "B")


def test_search_refuses_an_index_or_matcher_made_differently(world, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(world / "mean-document", mixed)
    for name in ("index.faiss", "index.json"):
        shutil.copy(world / "last-document" / name, mixed / name)
    res = invoke("search", "perl", "--index", mixed)
    assert res.exit_code == 1
    assert "pooling 'mean' for the corpus embeddings" in res.output and "but 'last' for the index" in res.output
    res = invoke("search", "perl", "--index", world / "mean-document", "--mode", "tree", "--matcher",
                 world / "matcher-last", "-k", 3)
    assert res.exit_code == 1 and f"the matcher {world / 'matcher-last'} does not match" in res.output
    assert "pooling 'mean' for the corpus embeddings" in res.output and "but 'last' for the matcher" in res.output
    res = invoke("search", "perl", "--index", world / "short-document", "--mode", "tree", "--matcher",
                 world / "matcher-last", "-k", 3)
    assert res.exit_code == 1 and "max_length 16 for the corpus embeddings" in res.output
    ok("search", "perl", "--index", world / "mean-document", "--mode", "hybrid", "--matcher", world / "matcher-mean",
       "-k", 3)


def test_queries_are_embedded_with_the_corpus_max_length(world):
    """A document searched for with its own text finds itself at cosine 1 only if the query keeps as many tokens
    as the corpus embedding did (16 here, where the model's context is 64)."""
    _, ids, texts, meta = load_emb_dir(world / "short-document")
    long_doc = next(i for i, t in enumerate(texts) if len(t.encode()) > 64)
    res = ok("search", texts[long_doc], "--index", world / "short-document", "-k", 1, "--json")
    hit = json.loads(res.stdout)
    assert hit["id"] == ids[long_doc] and hit["score"] == pytest.approx(1.0, rel=1e-5)


def test_train_matcher_records_and_checks_pooling(world, tmp_path):
    ok("train-matcher", "--pairs", world / "pairs.jsonl", "--model", world / "lm", "--pooling", "mean", "--context",
       8, "--epochs", 1, "--d-model", 16, "--layers", 1, "--test-fraction", 0.3, "--out", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["pooling"], config["max_length"]) == ("mean", 64)
    res = invoke("train-matcher", "--pairs", world / "pairs.jsonl", "--query-emb", world / "mean-summary",
                 "--target-emb", world / "last-document", "--context", 8, "--out", tmp_path / "m2")
    assert res.exit_code == 1 and "pooling 'mean' for the query embeddings" in res.output
    res = invoke("train-matcher", "--pairs", world / "pairs.jsonl", "--query-emb", world / "mean-summary",
                 "--target-emb", world / "mean-document", "--pooling", "last", "--context", 8, "--out", tmp_path / "m3")
    assert res.exit_code == 1 and "but 'last' for --pooling" in res.output


def test_a_model_s_own_pooling_is_the_default_and_is_enforced(world, tmp_path):
    """A model whose config.json sets its pooling (as a fine-tuned embedder will): embed uses it, and refuses
    another one naming both."""
    shutil.copytree(world / "lm", tmp_path / "lm")
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**config, "pooling": "mean"}))
    assert resolve_spec(tmp_path / "lm").pooling == "mean"
    import mixret
    model = mixret.load(tmp_path / "lm")
    assert model.embedding_defaults == {"pooling": "mean"}
    np.testing.assert_array_equal(encode(model, ["a text"]), encode(model, ["a text"], pooling="mean"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = invoke("embed", world / "pairs.jsonl", "--model", tmp_path / "lm", "--field", "summary", "--out",
                     tmp_path / "e")
    assert res.exit_code == 0 and json.loads((tmp_path / "e" / "meta.json").read_text())["pooling"] == "mean"
    res = invoke("embed", world / "pairs.jsonl", "--model", tmp_path / "lm", "--field", "summary", "--pooling", "last",
                 "--out", tmp_path / "e2")
    assert res.exit_code == 1
    assert f"pooling 'mean' for the config.json of {tmp_path / 'lm'} but 'last' for the embeddings" in res.output
