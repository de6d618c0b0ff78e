"""Writes to `mixret serve` (a real uvicorn process on a loopback port): the token, durability across a SIGKILL, and
searches during writes.

The corpus: 40 bundled documents embedded by a tiny untrained model (context 64), a Flat index; each test writes to
its own copy.
"""
import asyncio
import json
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from close import assert_close
from test_corpus import embed, update  # noqa: F401
from test_search import invoke, tiny_lm
from test_serve import Server

from mixret.errors import MixretError
from mixret.retrieval.bm25 import BM25Index
from mixret.retrieval.corpus import WAL_NAME
from mixret.retrieval.embeddings import load_emb_dir
from mixret.retrieval.index import VectorIndex
from mixret.retrieval.search import load_corpus
from mixret.retrieval.tfidf import TfidfIndex
from mixret.serve import read_token

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from mixret.data import bundled_pairs_path, load_pairs
    root = tmp_path_factory.mktemp("writes")
    tiny_lm(32, 0).save_pretrained(root / "lm")
    docs = [(p.id, p.target) for p in load_pairs(bundled_pairs_path())[:40]]
    embed(root, docs, "emb")
    (root / "token").write_text(f"  {TOKEN}\n")
    return root


@pytest.fixture
def emb(base, tmp_path):
    shutil.copytree(base / "emb", tmp_path / "emb")
    return tmp_path / "emb"


def start(emb, tmp_path, *args, name="server"):
    return Server(tmp_path / f"{name}.log", "--index", emb, *args).wait()


def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def post_docs(server, docs, headers=None, **kw):
    return httpx.post(server.url + "/documents", json={"documents": [{"id": i, "text": t} for i, t in docs]},
                      headers=headers or {}, timeout=60, **kw)


def search(server, query, mode="bm25", k=3):
    res = server.post({"query": query, "mode": mode, "k": k})
    assert res.status_code == 200, res.text
    return res.json()


BAD_WRITES = [  # (body, status, what the error says)
    ({"documents": []}, 422, "expected 1 to 1000"),
    ({"documents": [{"id": "a"}]}, 422, "documents.0.text: Field required"),
    ({"documents": [{"text": "a text"}]}, 422, "documents.0.id: Field required"),
    ({"documents": [{"id": 7, "text": "a text"}]}, 422, "documents.0.id: Input should be a valid string"),
    ({"documents": [{"id": "a", "text": "   "}]}, 422, "documents[0].text is empty"),
    ({"documents": [{"id": "", "text": "x"}]}, 422, "expected a non-empty id"),
    ({"documents": [{"id": " a", "text": "x"}]}, 422, "without surrounding whitespace"),
    ({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, 422, "repeats an earlier document's id"),
    ({"documents": [{"id": "a", "text": "x", "vector": [1]}]}, 422, "Extra inputs are not permitted"),
    ({"docs": []}, 422, "expected {\"documents\""),
    (b'{"documents": [', 400, "not valid JSON"),
    (json.dumps({"documents": [{"id": "big", "text": "a" * (17 << 20)}]}).encode(), 413, "request body too large"),
]


def test_writes_with_the_token_are_searchable_at_once_and_without_it_change_nothing(emb, tmp_path, base):
    server = start(emb, tmp_path, "--token-file", base / "token")
    try:
        existing = load_emb_dir(emb)[1][0]
        health = server.get("/health").json()
        assert health["writes"] == "on" and health["seq"] == 0 and health["corpus_size"] == 40
        new = [("new-1", "zanzibar quokka telescope"), ("new-2", "marmalade harpsichord")]
        for headers, message in (({}, "expected the header 'Authorization: Bearer TOKEN'"),
                                 (auth("wrong"), "wrong token"), (auth(TOKEN + "x"), "wrong token"),
                                 ({"Authorization": TOKEN}, "expected the header"),
                                 ({"Authorization": f"Basic {TOKEN}"}, "expected the header")):
            res = post_docs(server, new, headers)
            assert res.status_code == 401 and message in res.json()["error"], res.text
            assert res.headers["www-authenticate"] == "Bearer"
            res = httpx.delete(server.url + "/documents/" + existing, headers=headers, timeout=60)
            assert res.status_code == 401 and server.get("/documents/" + existing).status_code == 200
        for body, status, message in BAD_WRITES:
            res = httpx.post(server.url + "/documents", timeout=60, headers=auth(),
                             **({"content": body} if isinstance(body, bytes) else {"json": body}))
            assert res.status_code == status and message in res.json()["error"], (str(body)[:80], res.text)
        assert server.get("/health").json()["seq"] == 0 and server.get("/documents/new-1").status_code == 404
        assert search(server, "zanzibar quokka")["hits"][0]["score"] == 0  # nothing matches yet

        res = post_docs(server, new, auth())
        assert res.status_code == 200 and res.json() == {"written": ["new-1", "new-2"], "seq": 1, "corpus_size": 42}
        for mode in ("bm25", "vector", "tfidf"):
            assert search(server, "zanzibar quokka telescope", mode)["hits"][0]["id"] == "new-1", mode
        replaced_id = search(server, "perl")["hits"][0]["id"]
        res = post_docs(server, [(replaced_id, "a harpsichord tuned by a quokka")], auth())
        assert res.status_code == 200 and res.json()["corpus_size"] == 42
        assert server.get(f"/documents/{replaced_id}").json()["text"] == "a harpsichord tuned by a quokka"
        res = httpx.delete(server.url + "/documents/new-2", headers=auth(), timeout=60)
        assert res.status_code == 200 and res.json() == {"deleted": ["new-2"], "seq": 3, "corpus_size": 41}
        assert all(h["id"] != "new-2" for h in search(server, "marmalade harpsichord", k=41)["hits"])
        assert search(server, "marmalade harpsichord", "tfidf")["hits"][0]["id"] == replaced_id
        res = httpx.delete(server.url + "/documents/new-2", headers=auth(), timeout=60)
        assert res.status_code == 404 and "no document with id 'new-2'" in res.json()["error"]
        assert server.get("/health").json()["seq"] == 3
    finally:
        server.stop()
    # the folder, with its log, is what the server had acknowledged
    res = invoke("search", "zanzibar quokka telescope", "--index", emb, "--mode", "bm25", "-k", 1, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["id"] == "new-1", res.output
    c = load_corpus(emb, ["bm25"])
    assert len(c.ids) == 41 and "new-2" not in c.ids and c.texts[c.ids.index(replaced_id)].startswith("a harpsi")


def test_no_token_configured_means_writes_answer_403(emb, tmp_path):
    server = start(emb, tmp_path)
    try:
        assert server.get("/health").json()["writes"] == "off"
        for res in (post_docs(server, [("x", "some text")], auth()),
                    httpx.delete(server.url + "/documents/x", headers=auth(), timeout=60)):
            assert res.status_code == 403 and "--token-file FILE (or the MIXRET_TOKEN" in res.json()["error"]
        assert server.get("/health").json()["corpus_size"] == 40
    finally:
        server.stop()
    assert not (emb / WAL_NAME).exists()


def test_read_token(tmp_path):
    (tmp_path / "t").write_text("\n  abc \n")
    assert read_token(tmp_path / "t", {"MIXRET_TOKEN": "other"}) == "abc"
    assert read_token(None, {"MIXRET_TOKEN": " xyz\n"}) == "xyz"
    assert read_token(None, {}) is None
    (tmp_path / "empty").write_text(" \n")
    for args in ((tmp_path / "empty", {}), (None, {"MIXRET_TOKEN": " "})):
        with pytest.raises(MixretError, match="is empty; expected a secret token"):
            read_token(*args)
    with pytest.raises(MixretError, match="token file not found"):
        read_token(tmp_path / "none", {})


def test_sigkill_mid_stream_loses_no_acknowledged_write(emb, tmp_path, base):
    """Writes of two documents each stream in; the server is killed with SIGKILL after 15 are acknowledged. After a
    restart every acknowledged document is there, every other write is there whole or not at all, and the folder
    loads with `mixret search`."""
    server = start(emb, tmp_path, "--token-file", base / "token")
    acked, sent, stop = [], [], threading.Event()

    def writer():
        with httpx.Client(timeout=30) as client:
            for i in range(500):   # bounded: the kill ends it long before
                if stop.is_set():
                    return
                docs = [(f"w{i}a", f"stream write {i} alpha"), (f"w{i}b", f"stream write {i} beta")]
                sent.append(i)
                try:
                    res = client.post(server.url + "/documents", headers=auth(),
                                      json={"documents": [{"id": d, "text": t} for d, t in docs]})
                except httpx.HTTPError:
                    return
                assert res.status_code == 200, res.text
                acked.append(i)

    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + 120
    while len(acked) < 15 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    server.proc.kill()           # SIGKILL, mid-stream
    server.proc.wait()
    stop.set()
    thread.join(60)
    assert len(acked) >= 15 and not thread.is_alive()

    server = start(emb, tmp_path, "--token-file", base / "token", name="restarted")
    try:
        found = lambda doc_id: server.get(f"/documents/{doc_id}").status_code == 200
        for i in sent:
            there = (found(f"w{i}a"), found(f"w{i}b"))
            assert there in ((True, True), (False, False)), f"write {i} is half there"
            if i in acked:
                assert there == (True, True), f"acknowledged write {i} was lost"
        size = server.get("/health").json()["corpus_size"]
        assert search(server, "stream write alpha", k=3)["hits"][0]["id"].startswith("w")
    finally:
        server.stop()
    res = invoke("search", f"stream write {acked[-1]} beta", "--index", emb, "--mode", "bm25", "-k", 1, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["id"] == f"w{acked[-1]}b", res.output
    assert len(load_corpus(emb, ["vector"]).ids) == size


def test_searches_during_writes_each_see_one_corpus_state(emb, tmp_path, base):
    """200 searches (bm25, vector and tfidf) while 100 writes add one document each: none fails, and each answer is
    exactly the answer of the corpus after the number of writes it reports, BM25 with the k1, b and stemmer of the
    folder's bm25.json."""
    from mixret.retrieval.bm25 import BM25Params, save_bm25
    meta = json.loads((emb / "meta.json").read_text())
    save_bm25(emb, BM25Params(0.9, 0.3, False, model={"path": meta["model_path"], "hash": meta["model_hash"]}))
    server = start(emb, tmp_path, "--token-file", base / "token")
    assert server.get("/health").json()["bm25"]["k1"] == 0.9
    query = "zebra quokka"
    texts = [f"zebra quokka number {i} " + "lorem " * (i % 7) for i in range(100)]

    async def load():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            async def writes():
                out = []
                for i, text in enumerate(texts):
                    out.append(await client.post("/documents", headers=auth(),
                                                 json={"documents": [{"id": f"z{i}", "text": text}]}))
                return out

            async def searches():
                out = []
                for wave in range(20):
                    batch = [{"query": query, "mode": ("bm25", "vector", "tfidf")[j % 3], "k": 10} for j in range(10)]
                    out += await asyncio.gather(*(client.post("/search", json=b) for b in batch))
                    await asyncio.sleep(0.02)
                return out
            return await asyncio.gather(writes(), searches())

    try:
        written, answers = asyncio.run(load())
    finally:
        server.stop()
    assert [r.status_code for r in written] == [200] * 100
    assert [r.json()["seq"] for r in written] == list(range(1, 101))
    assert [r.status_code for r in answers] == [200] * 200
    final = load_corpus(emb, ["vector"])
    assert final.ids[40:] == [f"z{i}" for i in range(100)]
    q = final.encode([query])
    seqs = set()
    for r in answers:
        body = r.json()
        j = body["seq"]
        seqs.add(j)
        assert body["corpus_size"] == 40 + j
        state_ids, state_texts = final.ids[:40 + j], final.texts[:40 + j]
        if body["mode"] == "bm25":
            scores, rows = BM25Index(state_texts, k1=0.9, b=0.3, stemmer=False).search([query], 10)
        elif body["mode"] == "tfidf":
            scores, rows = TfidfIndex(state_texts).search([query], 10)
        else:
            scores, rows = VectorIndex.build(final.snapshot.emb[:40 + j]).search(q, 10)
        assert [h["id"] for h in body["hits"]] == [state_ids[i] for i in rows[0]], (body["mode"], j)
        assert_close(np.array([h["score"] for h in body["hits"]]), scores[0])
    assert len(seqs) >= 3, f"the searches saw only the corpus states {sorted(seqs)}"
