"""`mixret serve` as a real uvicorn process on a free loopback port, queried over HTTP.

The corpus is test_search's: 120 bundled documents embedded by a tiny untrained model, a Flat index and an
untrained matcher (context 16), so every mode runs in milliseconds.
"""
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_search import corpus, invoke  # noqa: F401  (corpus is a fixture)

from mixret.retrieval.search import MODES

ROOT = Path(__file__).resolve().parent.parent
QUERIES = ["Perl bindings for OpenLDAP", "a puzzle game", "library for parsing XML", "music player",
           "compress files into zip archives", "Python"]
K = 5  # below the matcher's group size (15), so tree search accepts it


class Server:
    """`mixret serve ARGS --port 0` in a child process; its URL is read from uvicorn's start-up line."""

    def __init__(self, log: Path, *args):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mixret.cli", "serve", "--port", "0", "--threads", "1",
                                          *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.url = None

    def wait(self, timeout: float = 120) -> "Server":
        deadline = time.monotonic() + timeout
        while self.url is None:
            m = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", self.output())
            if m:
                self.url = m.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not start:\n{self.output()}")
            else:
                time.sleep(0.1)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60)

    def post(self, body, **kw) -> httpx.Response:
        kw.setdefault("content" if isinstance(body, (bytes, str)) else "json", body)
        return httpx.post(self.url + "/search", timeout=60, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(corpus, tmp_path_factory):  # noqa: F811
    """Two servers on the same corpus, started together: with the matcher, and without one."""
    logs = tmp_path_factory.mktemp("serve")
    full = Server(logs / "full.log", "--index", corpus / "emb", "--matcher", corpus / "matcher",
                  "--fusion-weight", "0.5")
    bare = Server(logs / "bare.log", "--index", corpus / "emb")
    try:
        yield full.wait(), bare.wait()
    finally:
        full.stop()
        bare.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def pairs(hits) -> list[tuple[str, float]]:
    return [(h["id"], h["score"]) for h in hits]


def assert_same_hits(got, expected):
    """Same ids in the same order, scores equal to float32 rounding (relative to the scores' scale)."""
    assert [i for i, _ in got] == [i for i, _ in expected]
    got_s, exp_s = np.array([s for _, s in got]), np.array([s for _, s in expected])
    np.testing.assert_allclose(got_s, exp_s, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(exp_s).max(initial=0)))


def cli_hits(corpus, query: str, mode: str, k: int):  # noqa: F811
    res = invoke("search", query, "--index", corpus / "emb", "--matcher", corpus / "matcher", "--mode", mode,
                 "--fusion-weight", "0.5", "-k", k, "--json")
    assert res.exit_code == 0, res.output
    return [(h["id"], h["score"]) for h in map(json.loads, res.stdout.splitlines())]


# -- health, binding, results -----------------------------------------------------------------

def test_health_binds_loopback_and_lists_modes(servers, corpus):  # noqa: F811
    full, bare = servers
    assert full.url.startswith("http://127.0.0.1:")  # no --host: loopback only
    health = full.get("/health").json()
    assert health["modes"] == list(MODES) and health["modes_off"] == {}
    assert health["corpus_size"] == 120 and health["dim"] == 32 and health["index"] == "Flat"
    assert health["matcher"] == str(corpus / "matcher")
    health = bare.get("/health").json()
    assert set(health["modes"]) | set(health["modes_off"]) == set(MODES)
    assert {"tree", "hybrid", "fusion"} <= set(health["modes_off"]) and "vector" in health["modes"]
    assert all("needs a matcher" in why for mode, why in health["modes_off"].items() if mode != "fusion")
    assert "needs a fusion weight" in health["modes_off"]["fusion"]
    assert full.get("/openapi.json").json()["paths"].keys() >= {"/search", "/health"}
    assert full.get("/docs").status_code == 200
    page = full.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<input id="q"' in page.text and "<script" in page.text


@pytest.mark.parametrize("mode", MODES)
def test_results_equal_cli_search(server, corpus, mode):  # noqa: F811
    from mixret.retrieval.embeddings import load_emb_dir
    _, ids, texts, _ = load_emb_dir(corpus / "emb")
    for query in QUERIES[:3] + [texts[7]]:
        res = server.post({"query": query, "mode": mode, "k": K})
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["query"] == query and body["mode"] == mode and body["k"] == K
        assert [h["rank"] for h in body["hits"]] == list(range(1, K + 1))
        assert_same_hits(pairs(body["hits"]), cli_hits(corpus, query, mode, K))
        assert all(len(h["snippet"]) <= 200 for h in body["hits"])
        assert body["timings"]["total_ms"] > 0 and body["timings"]["batch_queries"] >= 1
        assert (body["passes"] > 0) == (mode in ("tree", "hybrid"))
    if mode == "vector":  # a document finds itself
        assert server.post({"query": texts[7], "k": 1}).json()["hits"][0]["id"] == ids[7]


@pytest.mark.parametrize("mode", MODES)
def test_batch_equals_single_queries(server, mode):
    res = server.post({"queries": QUERIES, "mode": mode, "k": K})
    assert res.status_code == 200, res.text
    results = res.json()["results"]
    assert [r["query"] for r in results] == QUERIES
    assert res.json()["timings"]["batch_queries"] >= len(QUERIES)
    for query, result in zip(QUERIES, results):
        single = server.post({"query": query, "mode": mode, "k": K}).json()
        assert_same_hits(pairs(result["hits"]), pairs(single["hits"]))
        assert result["passes"] == single["passes"]


def test_concurrent_requests_equal_sequential(server):
    """200 requests at once over every mode and two values of k: none fails, each equals its sequential
    answer, and the server encoded some of them together."""
    requests = [{"query": QUERIES[i % len(QUERIES)], "mode": MODES[i % len(MODES)], "k": K - i % 2}
                for i in range(200)]
    sequential = {}
    for r in requests:
        key = json.dumps(r, sort_keys=True)
        if key not in sequential:
            sequential[key] = pairs(server.post(r).json()["hits"])

    async def all_at_once():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post("/search", json=r) for r in requests))

    responses = asyncio.run(all_at_once())
    assert [r.status_code for r in responses] == [200] * 200
    for r, response in zip(requests, responses):
        assert_same_hits(pairs(response.json()["hits"]), sequential[json.dumps(r, sort_keys=True)])
    assert max(r.json()["timings"]["batch_queries"] for r in responses) > 1
    assert server.proc.poll() is None


# -- bad input --------------------------------------------------------------------------------

BAD = [  # (body, status, what the error says)
    ({"query": "   "}, 422, "query is empty; expected some text"),
    ({"queries": ["perl", ""]}, 422, "queries[1] is empty"),
    ({"queries": []}, 422, "expected 1 to 256"),
    ({"queries": ["perl"] * 257}, 422, "holds 257 queries; expected 1 to 256"),
    ({}, 422, 'give either "query"'),
    ({"query": "perl", "queries": ["perl"]}, 422, "not both"),
    ({"query": "perl", "mode": "semantic"}, 422, "unknown mode 'semantic'; expected one of"),
    ({"query": "perl", "mode": "../../etc/passwd"}, 422, "unknown mode"),
    ({"query": "perl", "k": 0}, 422, "k=0 is out of range; expected 1 to 120"),
    ({"query": "perl", "k": 121}, 422, "k=121 is out of range"),
    ({"query": "perl", "k": -3}, 422, "k=-3 is out of range"),
    ({"query": "perl", "k": "5"}, 422, "k: Input should be a valid integer"),
    ({"query": "perl", "k": 2.5}, 422, "k: Input should be a valid integer"),
    ({"query": 42}, 422, "query: Input should be a valid string"),
    ({"query": "perl", "index": "/etc"}, 422, "index: Extra inputs are not permitted"),
    ({"query": "x" * 4001}, 422, "has 4001 characters; expected at most 4000"),
    ({"query": "perl", "mode": "tree", "k": 15}, 422, "k must be below 15"),
    (b'{"query": "perl", ', 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"[1, 2]", 422, "Input should be an object"),
    (b'{"query": "\\ud800"}', 400, "not valid JSON"),  # a lone surrogate
    (b"\xff\xfe", 400, "not valid JSON"),
    (json.dumps({"query": "a" * (1 << 20)}).encode(), 413, "request body too large"),
]


def test_bad_input_gets_4xx_and_the_server_keeps_answering(servers):
    full, bare = servers
    for body, status, message in BAD:
        res = full.post(body)
        assert res.status_code == status, (body if len(str(body)) < 100 else str(body)[:100], res.text)
        assert message in res.json()["error"], res.text
        assert full.post({"query": "perl", "k": 2}).status_code == 200
    for mode in ("tree", "hybrid"):
        res = bare.post({"query": "perl", "mode": mode})
        assert res.status_code == 422 and f"mode '{mode}' is not available on this server" in res.json()["error"]
        assert "needs a matcher" in res.json()["error"]

    big = json.dumps({"query": "a" * (1 << 20)}).encode()
    chunked = httpx.post(full.url + "/search", content=iter([big[:1000], big[1000:]]), timeout=60)  # no length
    assert chunked.status_code == 413 and "too large" in chunked.json()["error"]
    for length, status in ((b"x", b"400"), (b"-1", b"400"), (b"99999999999", b"413")):  # sent raw: httpx refuses
        reply = raw_request(full.url, b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Length: " + length +
                            b"\r\nConnection: close\r\n\r\n{}")
        assert reply.startswith(b"HTTP/1.1 " + status), reply
    assert full.get("/../../etc/passwd").status_code == 404
    assert full.get("/search").status_code == 405 and "error" in full.get("/search").json()
    form = httpx.post(full.url + "/search", data={"query": "perl"})  # a form post is not JSON
    assert form.status_code == 400
    for server in servers:
        assert server.proc.poll() is None
        assert server.post({"query": "perl", "k": 2}).status_code == 200


def raw_request(url: str, data: bytes) -> bytes:
    import socket
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


# -- the page in a browser --------------------------------------------------------------------

def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_in_headless_chromium(server):
    """The results page in a real browser: type a query, submit, and see both modes' hits side by side."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright); the page is checked in a browser only "
                    "where it is")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium); the page is checked in a browser only "
                    "where one is installed")
    expected = {mode: [h["id"] for h in server.post({"query": "perl library", "mode": mode, "k": 4}).json()["hits"]]
                for mode in ("bm25", "vector")}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelectorAll('#modeA option').length > 0")
            assert page.input_value("#modeA") == "bm25" and page.input_value("#modeB") == "vector"
            page.fill("#k", "4")
            page.fill("#q", "perl library")
            page.press("#q", "Enter")
            page.wait_for_selector("#hitsA li.hit")
            page.wait_for_selector("#hitsB li.hit")
            for side, mode in (("A", "bm25"), ("B", "vector")):
                assert page.text_content(f"#title{side}") == mode
                assert page.locator(f"#hits{side} .id").all_text_contents() == expected[mode]
                assert "hits in" in page.text_content(f"#meta{side}")
            shared = set(expected["bm25"]) & set(expected["vector"])
            assert page.locator("#hitsA li.shared").count() == len(shared)
            assert errors == []
        finally:
            browser.close()
