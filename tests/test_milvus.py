"""The Milvus backend, on Milvus Lite (a local file): `mixret index --backend milvus` answers the exact top k of
FAISS's Flat index, and search and serve work against it."""
import json
import shutil

import numpy as np
import pytest
from close import assert_close
from test_corpus import embed, update, write_jsonl
from test_search import tiny_lm
from test_serve import Server

from mixret.retrieval.index import VectorIndex
from mixret.retrieval.search import load_corpus

pytest.importorskip("pymilvus", reason="the milvus backend needs pymilvus and milvus-lite (mixret's dev extra)")


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    from mixret.data import bundled_pairs_path, load_pairs
    root = tmp_path_factory.mktemp("milvus")
    tiny_lm(32, 0).save_pretrained(root / "lm")
    return embed(root, [(p.id, p.target) for p in load_pairs(bundled_pairs_path())[:60]], "emb")


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_milvus_answers_the_exact_top_k_of_faiss_flat(emb, tmp_path, metric):
    from test_search import invoke
    folder = tmp_path / "emb"
    shutil.copytree(emb, folder)
    res = invoke("index", folder, "--backend", "milvus", "--uri", tmp_path / "vectors.db", "--metric", metric)
    assert res.exit_code == 0, res.output
    assert "FLAT index" in res.output and "in the Milvus collection mixret_emb" in res.output
    record = json.loads((folder / "index.json").read_text())
    assert record["backend"] == "milvus" and not (folder / "index.faiss").exists()

    c = load_corpus(folder, ["vector"])
    assert type(c.retriever.index).__name__ == "MilvusIndex"
    queries = c.encode(["Perl bindings for OpenLDAP", "a puzzle game", "music player"] + c.texts[:20])
    flat = VectorIndex.build(c.snapshot.emb, "Flat", metric)
    got, want = c.retriever.index.search(queries, 10), flat.search(queries, 10)
    np.testing.assert_array_equal(got[1], want[1])
    assert_close(got[0], want[0])
    res = c.retriever.search("vector", 60, query_emb=queries[:2])   # k = the whole corpus
    assert sorted(res.indices[0].tolist()) == list(range(60))
    c.retriever.index.close()   # lets the CLI below open the file

    res = invoke("search", "Perl bindings for OpenLDAP", "--index", folder, "-k", 3, "--json")
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["id"] for line in res.stdout.splitlines()] == [c.ids[i] for i in want[1][0][:3]]
    # updates keep to FAISS for now, and say so; a FAISS rebuild replaces the Milvus record
    res = update(folder, "--add", write_jsonl(tmp_path / "add.jsonl", [("new", "a new text")]))
    assert res.exit_code == 1 and "updates keep to the FAISS backend for now" in res.output
    assert invoke("index", folder).exit_code == 0
    assert "backend" not in json.loads((folder / "index.json").read_text())


def test_bad_milvus_options_say_what_was_expected(emb, tmp_path):
    from test_search import invoke
    res = invoke("index", emb, "--backend", "milvus")
    assert res.exit_code == 1 and "--backend milvus needs --uri" in res.output
    res = invoke("index", emb, "--backend", "milvus", "--uri", tmp_path / "vectors.sqlite")
    assert res.exit_code == 1 and "a file ending in .db" in res.output
    res = invoke("index", emb, "--backend", "milvus", "--uri", tmp_path / "v.db", "--factory", "HNSW32")
    assert res.exit_code == 1 and "indexes FLAT" in res.output
    res = invoke("index", emb, "--uri", tmp_path / "v.db")
    assert res.exit_code == 1 and "go with --backend milvus" in res.output


def test_serve_searches_a_milvus_index(emb, tmp_path):
    from test_search import invoke
    folder = tmp_path / "emb"
    shutil.copytree(emb, folder)
    assert invoke("index", folder, "--backend", "milvus", "--uri", tmp_path / "vectors.db").exit_code == 0
    expected = invoke("search", "a puzzle game", "--index", folder, "-k", 4, "--json")
    server = Server(tmp_path / "serve.log", "--index", folder).wait()
    try:
        assert server.get("/health").json()["index"] == "FLAT"
        hits = server.post({"query": "a puzzle game", "mode": "vector", "k": 4}).json()["hits"]
    finally:
        server.stop()
    assert [h["id"] for h in hits] == [json.loads(line)["id"] for line in expected.stdout.splitlines()]
    (tmp_path / "token").write_text("t0ken")
    refused = Server(tmp_path / "refused.log", "--index", folder, "--token-file", tmp_path / "token")
    assert refused.proc.wait(120) == 1 and "writes need the FAISS backend for now" in refused.output()
