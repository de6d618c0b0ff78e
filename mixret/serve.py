"""`mixret serve`: the corpus of an EMB_DIR searchable over HTTP, with everything loaded once.

Endpoints (FastAPI on uvicorn, bound to 127.0.0.1 unless told otherwise):
    POST /search  {"query": "...", "mode": "vector", "k": 10} -> ranked hits (rank, id, score, snippet) and
                  timings; {"queries": [...], ...} is the batch form (one result per query, in order)
    GET  /health  model, index, BM25 parameters, corpus size, the modes this server answers and why any other is off
    GET  /        a results page: one query, the hits of two chosen modes side by side
    GET  /docs    the OpenAPI page FastAPI generates
    GET  /documents/ID             a document as the corpus holds it now
    POST /documents {"documents": [{"id": "...", "text": "..."}, ...]}  adds, or replaces an existing id   (writes)
    DELETE /documents/ID           removes                                                              (writes)

Writes are off unless the server was started with a token (--token-file FILE or MIXRET_TOKEN); they then need
`Authorization: Bearer TOKEN` (compared in constant time), and answer 401 without it or with another; with no
token configured they answer 403 and say how to turn them on. A write is embedded as the folder's texts were, then
appended to EMB_DIR/writes.wal and flushed to the disk (mixret.retrieval.corpus), then swapped in: it is acknowledged
(200,
with the ids written or removed, its seq and the corpus size) only once it is durable and searchable. Writes run
one at a time on their own thread. Each corpus state (texts, embeddings, FAISS index, BM25, TF-IDF) is built whole and
never changed: a search batch takes the current one at its start and keeps it to the end, so it sees the corpus
before a write or after it, never a mix, and says which (seq, corpus_size). BM25 follows writes from the term
statistics it keeps (only new texts are tokenised; the scores of a fresh index; see scripts/bench_corpus.py), and
TF-IDF from the term counts it keeps, likewise (mixret.retrieval.tfidf). At start
the log's writes are replayed and folded into a new version of the folder, and the log emptied; the server holds
the folder's write lock while it runs.

Modes are those of `mixret.retrieval.search.MODES`, searched by the same `Retriever.search` as `mixret search`, with
query embeddings from the same `model.encode`. At start-up every mode runs once on a probe query: a mode
that fails (tree and hybrid without a matcher) is reported off with the Retriever's reason, and a mode that
answers without query embeddings (bm25, tfidf) never has its queries encoded.

Micro-batching. Requests go to one queue; a batch opens with the first request and closes when it holds
`max_batch` queries or `max_wait_ms` have passed. Its distinct query texts are encoded in one forward pass,
then each (mode, k) group of it is searched in one Retriever call. Batches run one at a time on a single
worker thread, off the event loop; requests that arrive meanwhile form the next batch. torch and FAISS
threads are set once, before loading.

Bad input gets a 4xx with {"error": "..."} saying what was expected: 400 malformed JSON, 413 a body over
MAX_BODY_BYTES (MAX_WRITE_BODY_BYTES for /documents), 422 anything else (empty query or text, unknown or
unavailable mode, k out of range, wrong types, unknown fields, an id repeated in one write), 404 an unknown id,
409 a delete that would empty the corpus. A refused write changes nothing. Clients send only texts, ids, a mode
name and k: nothing they send names a file.
"""

import asyncio
import hmac
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mixret.errors import MixretError
from mixret.models.encode import DTYPES
from mixret.retrieval.bm25 import BM25Index
from mixret.retrieval.corpus import Change, WriteLock, WriteLog, apply_change, fold_log
from mixret.retrieval.search import EMBEDDING_MODES, MODES, Retriever, load_corpus
from mixret.retrieval.tfidf import TfidfIndex
from mixret.version import __version__

MAX_BODY_BYTES = 1 << 20    # a request body larger than this is refused (413)
MAX_QUERIES = 256           # queries in one batch-form request
MAX_QUERY_CHARS = 4000      # characters in one query (the model truncates long queries anyway)
SNIPPET_CHARS = 200         # characters of each hit's text returned, whitespace collapsed
MAX_WRITE_BODY_BYTES = 16 << 20   # a POST /documents body larger than this is refused (413)
MAX_WRITE_DOCUMENTS = 1000  # documents in one POST /documents
MAX_ID_CHARS = 1000         # characters of a document id


# -- the loaded state -------------------------------------------------------------------------

@dataclass
class Job:
    """One request: its queries, searched with one mode and k."""
    queries: list[str]
    mode: str
    k: int


@dataclass
class Outcome:
    """A job's result (indices [Q, k], scores [Q, k], passes [Q]) or its error, and the batch's timings."""
    indices: np.ndarray | None = None
    scores: np.ndarray | None = None
    passes: np.ndarray | None = None
    error: MixretError | None = None
    timings: dict = field(default_factory=dict)
    state: object = None      # the State searched


@dataclass(frozen=True)
class State:
    """One corpus state, never changed once built: searches take the current one and keep it to the end (a write
    builds the next and swaps it in). seq: the last write it holds (write-ahead log numbering)."""
    snapshot: object          # mixret.retrieval.corpus.Snapshot
    retriever: object         # mixret.retrieval.search.Retriever over it
    rows: dict
    seq: int

    @property
    def ids(self) -> list[str]:
        return self.snapshot.ids

    @property
    def texts(self) -> list[str]:
        return self.snapshot.texts


class WriteRefused(MixretError):
    """A write that changes nothing, with its HTTP status (404: an unknown id; 422: anything else)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class Searcher:
    """The corpus of an EMB_DIR with its model, FAISS index, BM25 and matcher, loaded the way `mixret search`
    loads them (its write-ahead log applied); `options` (shortlist, shortlist_from) go to every Retriever.search
    call as in the CLI. writes=True holds the EMB_DIR's write lock, folds the log into a new version of the folder
    and takes writes (`write`): each is logged and flushed to the disk, then searchable."""

    def __init__(self, emb_dir, model_dir=None, matcher_dir=None, fusion_weight=None, writes: bool = False,
                 **options):

        self.emb_dir, self.writes, self.log = Path(emb_dir), writes, None
        self.lock = WriteLock(emb_dir).__enter__() if writes else None
        try:
            self.corpus = load_corpus(emb_dir, MODES, model_dir, matcher_dir, fusion_weight,
                                      options.get("shortlist_from", "vector"))
            self._open_corpus, self.model = self.corpus, self.corpus.model
            self.state = self._first_state()
        except BaseException:
            self.close()
            raise
        self.options = options
        self._write_lock = threading.Lock()
        index, spec = self.retriever.index, self.corpus.spec
        self.info = {"emb_dir": str(emb_dir), "model": self.corpus.model_dir, "model_hash": spec.model_hash,
                     "arch": self.model.config.arch, "dim": index.dim, "pooling": spec.pooling or "last",
                     "index": index.factory, "metric": index.metric,
                     "matcher": None if matcher_dir is None else str(matcher_dir),
                     "fusion": None if self.retriever.fusion is None else self.retriever.fusion.weight,
                     "bm25": self.bm25_info(), "writes": "on" if writes else "off",
                     "options": dict(options)}
        self.off = {m: why for m in MODES if (why := self.retriever.unavailable(m)) is not None}  # mode: why not
        self.modes = self.retriever.modes()

    def _first_state(self) -> State:
        """The loaded corpus as a State; with writes on, the log's writes folded into a new version first and BM25
        and TF-IDF built to follow writes."""
        snap, retriever = self.corpus.snapshot, self.corpus.retriever
        if self.writes and snap.index is not None and snap.index.backend != "faiss":
            raise MixretError(f"{self.emb_dir}: writes need the FAISS backend for now; this folder's vectors are in "
                              f"{snap.index.backend} (serve it without a token, or index it with `mixret index "
                              f"{self.emb_dir}` to take writes)")
        if self.writes:
            replayed = snap.seq - int(snap.meta.get("wal_applied", 0))
            snap = fold_log(self.emb_dir, snap, replayed)
            self.log = WriteLog(self.emb_dir, snap.emb.shape[1], snap.seq)
            params = retriever.bm25_params
            retriever._bm25 = params.index(snap.texts, keep_terms=True) if params is not None else \
                BM25Index(snap.texts, keep_terms=True)   # BM25 follows writes from kept term statistics
            retriever._tfidf = TfidfIndex(snap.texts, keep_terms=True)   # TF-IDF from kept term counts
        return State(snap, retriever, snap.rows(), snap.seq)

    def close(self) -> None:
        """Close the log and release the write lock (again: nothing)."""
        log, lock, self.log, self.lock = self.log, self.lock, None, None
        corpus, self._open_corpus = getattr(self, "_open_corpus", None), None
        if corpus is not None:
            corpus.close()
        if log is not None:
            log.close()
        if lock is not None:
            lock.__exit__(None, None, None)

    @property
    def retriever(self):
        return self.state.retriever

    @property
    def ids(self) -> list[str]:
        return self.state.ids

    @property
    def texts(self) -> list[str]:
        return self.state.texts

    def bm25_info(self) -> dict:
        """k1, b and stemmer of the BM25 searched (EMB_DIR/bm25.json, or the defaults) and where they come from."""
        params = self.retriever.bm25_params
        return {"k1": params.k1, "b": params.b, "stemmer": params.stemmer,
                "fitted": params.fitted.get("on") if params.fitted else None}

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.corpus.encode(texts)

    # -- writes -------------------------------------------------------------------------------
    def write(self, put: list[tuple[str, str]] = (), delete: list[str] = ()) -> dict:
        """Delete ids, then add or replace texts: embedded, logged and flushed to the disk, then swapped in as the
        new state -> {"seq", "corpus_size"}. A WriteRefused changes nothing. Writes run one at a time."""
        with self._write_lock:
            state = self.state
            missing = [doc_id for doc_id in delete if doc_id not in state.rows]
            if missing:
                raise WriteRefused(f"no document with id {missing[0]!r}; expected the id of a document in the "
                                   f"corpus", 404)
            ids, texts = [p[0] for p in put], [p[1] for p in put]
            emb = self._embed_documents(texts) if put else None
            change = Change(list(delete), ids, texts, emb)
            seq = self.log.seq + 1
            try:
                applied = apply_change(state.snapshot, change, seq, "the request")
            except MixretError as e:
                raise WriteRefused(str(e), 409 if "empty" in str(e) else 422) from None
            new_state = self._next_state(state, applied, seq)   # built whole before the write is logged
            self.log.append(change)            # durable from here on
            self.state = new_state
            return {"seq": seq, "corpus_size": len(applied.snapshot.ids)}

    def _embed_documents(self, texts: list[str]) -> np.ndarray:
        """Texts embedded as the folder's were (model, pooling, max length), rounded to the folder's dtype."""
        spec = self.corpus.spec
        E = self.model.encode(texts, batch_size=64, pooling=spec.pooling or "last", max_length=spec.max_length,
                              show_progress_bar=False, convert_to_numpy=False)
        return E.to(DTYPES[self.corpus.snapshot.meta.get("dtype", "float32")]).float().numpy()

    def _next_state(self, state: State, applied, seq: int) -> State:
        old, snap = state.retriever, applied.snapshot
        retriever = Retriever(snap.emb, snap.texts, index=snap.index, matcher=old.matcher, fusion=old.fusion,
                              bm25_params=old.bm25_params, query_chunk_bytes=old.query_chunk_bytes)
        retriever._bm25 = old.bm25.updated(applied.keep, snap.texts, applied.added)
        retriever._tfidf = old.tfidf.updated(applied.keep, snap.texts, applied.added)
        return State(snap, retriever, snap.rows(), seq)

    def document(self, doc_id: str) -> dict | None:
        state = self.state
        row = state.rows.get(doc_id)
        return None if row is None else {"id": doc_id, "text": state.texts[row], "seq": state.seq}

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """Search a batch of jobs, all on the corpus state current when it starts: the distinct texts of the jobs
        whose mode needs embeddings are encoded in one call, then each (mode, k) group is one Retriever.search
        call. A job's bad input fails only its own group."""
        state = self.state
        start = time.perf_counter()
        texts = list(dict.fromkeys(q for job in jobs if job.mode in EMBEDDING_MODES for q in job.queries))
        rows = {t: i for i, t in enumerate(texts)}
        emb = self._encode(texts) if texts else None
        encoded = time.perf_counter()
        timings = {"batch_queries": sum(len(job.queries) for job in jobs), "encode_ms": (encoded - start) * 1e3}
        groups: dict[tuple[str, int], list[int]] = {}
        for j, job in enumerate(jobs):
            groups.setdefault((job.mode, job.k), []).append(j)
        outcomes = [Outcome(state=state) for _ in jobs]
        for (mode, k), members in groups.items():
            queries = [q for j in members for q in jobs[j].queries]
            query_emb = emb[[rows[q] for q in queries]] if mode in EMBEDDING_MODES else None
            try:
                res = state.retriever.search(mode, k, query_emb=query_emb, queries=queries, **self.options)
            except MixretError as e:
                for j in members:
                    outcomes[j].error = e
                continue
            row = 0
            for j in members:
                n = len(jobs[j].queries)
                outcomes[j].indices, outcomes[j].scores = res.indices[row:row + n], res.scores[row:row + n]
                outcomes[j].passes = res.passes[row:row + n]
                outcomes[j].timings = {**timings, "search_ms": res.seconds * 1e3}
                row += n
        return outcomes

    def hits(self, indices: np.ndarray, scores: np.ndarray, state: State | None = None) -> list[dict]:
        """One query's results [k] in `state` (default: the current one) as JSON hits (a -1 index, a missing
        result, is left out)."""
        state = state or self.state
        out = []
        for rank, (i, s) in enumerate(zip(indices.tolist(), scores.tolist()), 1):
            if i >= 0:
                text = " ".join(state.texts[i].split())
                snippet = text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS - 3] + "..."
                out.append({"rank": rank, "id": state.ids[i], "score": s, "snippet": snippet})
        return out

    def health(self) -> dict:
        state = self.state
        return {"status": "ok", **self.info, "corpus_size": len(state.ids), "seq": state.seq, "modes": self.modes,
                "modes_off": self.off}


# -- micro-batching ---------------------------------------------------------------------------

class MicroBatcher:
    """Collects jobs from concurrent requests into batches for `run(jobs) -> outcomes`, which executes on
    one worker thread. A batch closes at max_batch queries or max_wait seconds after its first job."""

    def __init__(self, run, max_batch: int, max_wait: float):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixret-search")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, job: Job) -> tuple[Outcome, float]:
        """The job's outcome and the seconds it waited for its batch to start."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((job, future, time.perf_counter()))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            size, deadline = len(batch[0][0].queries), loop.time() + self.max_wait
            while size < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                batch.append(item)
                size += len(item[0].queries)
            started = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(self.executor, self.run, [job for job, _, _ in batch])
            except Exception as e:  # a bug, not bad input: fail this batch's requests, keep serving
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future, queued), outcome in zip(batch, outcomes):
                if not future.done():  # the client may have gone away
                    future.set_result((outcome, started - queued))


# -- the app ----------------------------------------------------------------------------------

class SearchRequest(BaseModel):
    """The body of POST /search: `query` or `queries`, and optionally mode and k."""
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str | None = Field(None, description="One query (or give `queries`).")
    queries: list[str] | None = Field(None, description=f"The batch form: 1 to {MAX_QUERIES} queries.")
    mode: str = Field("vector", description="A search mode (GET /health lists those this server answers).")
    k: int = Field(10, description="Hits per query, from 1 to the corpus size.")


def page_html() -> str:
    """The results page shipped in the package (mixret/serve_page.html)."""
    return resources.files("mixret").joinpath("serve_page.html").read_text(encoding="utf-8")


class BodyLimit:
    """ASGI middleware refusing request bodies over max_bytes (paths under a prefix of `limits`: its own limit)
    with 413, by Content-Length or while streaming."""

    def __init__(self, app, max_bytes: int, limits: dict[str, int] | None = None):
        self.app, self.max_bytes, self.limits = app, max_bytes, dict(limits or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi import HTTPException
        limit = next((n for prefix, n in self.limits.items() if scope.get("path", "").startswith(prefix)),
                     self.max_bytes)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and not length.isdigit():
            return await _send_json(send, 400, "invalid Content-Length header; expected a number of bytes")
        if length is not None and int(length) > limit:
            return await _send_json(send, 413, self._message(limit))
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, self._message(limit))
            return message
        await self.app(scope, limited, send)

    @staticmethod
    def _message(limit: int) -> str:
        return f"request body too large; expected at most {limit} bytes"


async def _send_json(send, status: int, error: str) -> None:
    import json
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(searcher: Searcher, max_batch: int = 64, max_wait_ms: float = 2.0, token: str | None = None):
    """The FastAPI app serving `searcher`; token: the Bearer token writes need (None: writes answer 403)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    batcher = MicroBatcher(searcher.run, max_batch, max_wait_ms / 1e3)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixret-write")

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        writer.shutdown(wait=True)
        searcher.close()

    app = FastAPI(title="mixret search", version=_version(), lifespan=lifespan,
                  description=f"Search {len(searcher.ids)} texts of {searcher.info['emb_dir']} in the modes "
                              f"{', '.join(searcher.modes)}.")
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES, limits={"/documents": MAX_WRITE_BODY_BYTES})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(page_html())

    @app.get("/health")
    async def health():
        return searcher.health()

    @app.post("/search", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": SearchRequest.model_json_schema()}}}})
    async def search(request: Request):
        """Search with one query, or with a batch of them; the body is read as JSON whatever its content type."""
        start = time.perf_counter()
        req = _parse_request(await request.body())
        job = Job(_check_queries(req), _check_mode(req.mode, searcher), req.k)
        corpus_size = len(searcher.ids)
        if not 1 <= job.k <= corpus_size:
            raise HTTPException(422, f"k={job.k} is out of range; expected 1 to {corpus_size} (the corpus size)")
        outcome, queued = await batcher.submit(job)
        if outcome.error is not None:
            raise HTTPException(422, str(outcome.error))
        timings = {"queue_ms": queued * 1e3, **outcome.timings, "total_ms": (time.perf_counter() - start) * 1e3}
        results = [{"query": q, "hits": searcher.hits(outcome.indices[i], outcome.scores[i], outcome.state),
                    "passes": int(outcome.passes[i])} for i, q in enumerate(job.queries)]
        corpus = {"seq": outcome.state.seq, "corpus_size": len(outcome.state.ids)}   # the corpus state searched
        if req.query is not None:  # plain JSON types: JSONResponse skips FastAPI's (slow) jsonable_encoder
            return JSONResponse({**results[0], "mode": job.mode, "k": job.k, **corpus, "timings": timings})
        return JSONResponse({"mode": job.mode, "k": job.k, "results": results, **corpus, "timings": timings})

    @app.get("/documents/{doc_id}")
    async def get_document(doc_id: str):
        """A document of the corpus as it is now: its id and text."""
        found = searcher.document(doc_id)
        if found is None:
            raise HTTPException(404, f"no document with id {doc_id!r}")
        return JSONResponse(found)

    @app.post("/documents", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": WriteRequest.model_json_schema()}}}})
    async def post_documents(request: Request):
        """Add documents, or replace those whose id exists (Authorization: Bearer TOKEN). Acknowledged once the
        write is on the disk and searchable."""
        _authorize(request, token)
        puts = _check_documents(_parse_write(await request.body()))
        done = await _write(writer, searcher, put=puts)
        return JSONResponse({"written": [doc_id for doc_id, _ in puts], **done})

    @app.delete("/documents/{doc_id}")
    async def delete_document(doc_id: str, request: Request):
        """Remove a document (Authorization: Bearer TOKEN). Acknowledged once the removal is on the disk."""
        _authorize(request, token)
        done = await _write(writer, searcher, delete=[doc_id])
        return JSONResponse({"deleted": [doc_id], **done})

    return app


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(description="The document's id: an id already in the corpus replaces that document.")
    text: str = Field(description="Its text (longer than the model's context: embedded from its start).")


class WriteRequest(BaseModel):
    """The body of POST /documents."""
    model_config = ConfigDict(extra="forbid", strict=True)
    documents: list[Document] = Field(description=f"1 to {MAX_WRITE_DOCUMENTS} documents.")


WRITE_SHAPE = '{"documents": [{"id": "...", "text": "..."}, ...]}'


def _authorize(request, token: str | None) -> None:
    """403 when writes are off (no token configured), 401 without the right Bearer token (compared in constant
    time)."""
    from fastapi import HTTPException
    if token is None:
        raise HTTPException(403, "writes are off on this server; start it with --token-file FILE (or the "
                                 "MIXRET_TOKEN environment variable) holding a secret token to turn them on, then "
                                 "send it as 'Authorization: Bearer TOKEN'")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPException(401, "this write needs a token; expected the header 'Authorization: Bearer TOKEN'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")):
        raise HTTPException(401, "wrong token; expected the token the server was started with",
                            headers={"WWW-Authenticate": "Bearer"})


def _parse_write(body: bytes) -> WriteRequest:
    from fastapi import HTTPException
    from pydantic import ValidationError
    try:
        return WriteRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise HTTPException(400, f"request body is not valid JSON ({errors[0]['msg']}); expected "
                                     f"{WRITE_SHAPE}") from None
        parts = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors[:5]]
        raise HTTPException(422, "; ".join(parts) + f"; expected {WRITE_SHAPE}") from None


def _check_documents(req: WriteRequest) -> list[tuple[str, str]]:
    from fastapi import HTTPException
    docs = req.documents
    if not 1 <= len(docs) <= MAX_WRITE_DOCUMENTS:
        raise HTTPException(422, f'"documents" holds {len(docs)} documents; expected 1 to {MAX_WRITE_DOCUMENTS}')
    seen = set()
    for i, doc in enumerate(docs):
        name = f"documents[{i}]"
        if not doc.id or doc.id != doc.id.strip() or any(c in doc.id for c in "\r\n"):
            raise HTTPException(422, f"{name}.id {doc.id!r}: expected a non-empty id without surrounding "
                                     f"whitespace or line breaks")
        if len(doc.id) > MAX_ID_CHARS:
            raise HTTPException(422, f"{name}.id has {len(doc.id)} characters; expected at most {MAX_ID_CHARS}")
        if not doc.text.strip():
            raise HTTPException(422, f"{name}.text is empty; expected some text to embed")
        for what, value in (("id", doc.id), ("text", doc.text)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise HTTPException(422, f"{name}.{what} is not valid Unicode text; expected text") from None
        if doc.id in seen:
            raise HTTPException(422, f"{name}.id {doc.id!r} repeats an earlier document's id; expected each id once")
        seen.add(doc.id)
    return [(doc.id, doc.text) for doc in docs]


async def _write(writer, searcher: Searcher, put=(), delete=()) -> dict:
    from fastapi import HTTPException
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(writer, lambda: searcher.write(list(put), list(delete)))
    except WriteRefused as e:
        raise HTTPException(e.status, str(e)) from None


def _parse_request(body: bytes) -> SearchRequest:
    """The request body as a SearchRequest, or an HTTPException: 400 for malformed JSON, 422 for the rest."""
    from fastapi import HTTPException
    from pydantic import ValidationError
    try:
        return SearchRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise HTTPException(400, f"request body is not valid JSON ({errors[0]['msg']}); expected an object "
                                     'such as {"query": "text", "mode": "vector", "k": 10}') from None
        parts = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors]
        raise HTTPException(422, "; ".join(parts) + '; expected {"query": str} or {"queries": [str, ...]}, '
                                 'with optional "mode": str and "k": int') from None


def _check_queries(req: SearchRequest) -> list[str]:
    from fastapi import HTTPException
    if (req.query is None) == (req.queries is None):
        raise HTTPException(422, 'give either "query" (a string) or "queries" (a list of strings), not '
                                 f'{"both" if req.query is not None else "neither"}')
    if req.queries is not None and not 1 <= len(req.queries) <= MAX_QUERIES:
        raise HTTPException(422, f'"queries" holds {len(req.queries)} queries; expected 1 to {MAX_QUERIES}')
    queries = [req.query] if req.query is not None else req.queries
    for i, q in enumerate(queries):
        name = "query" if req.query is not None else f"queries[{i}]"
        if not q.strip():
            raise HTTPException(422, f"{name} is empty; expected some text to search for")
        if len(q) > MAX_QUERY_CHARS:
            raise HTTPException(422, f"{name} has {len(q)} characters; expected at most {MAX_QUERY_CHARS}")
        try:
            q.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPException(422, f"{name} is not valid Unicode text (a lone surrogate?); expected text") from None
    return queries


def _check_mode(mode: str, searcher: Searcher) -> str:
    from fastapi import HTTPException

    if mode not in MODES:
        raise HTTPException(422, f"unknown mode {mode!r}; expected one of {', '.join(searcher.modes)}")
    if mode not in searcher.modes:
        raise HTTPException(422, f"mode {mode!r} is not available on this server: {searcher.off[mode]}; "
                                 f"available: {', '.join(searcher.modes)}")
    return mode


def _version() -> str:
    return __version__


# -- entry point ------------------------------------------------------------------------------

def read_token(token_file=None, environ=os.environ) -> str | None:
    """The write token: the content of token_file (surrounding whitespace stripped), else $MIXRET_TOKEN, else None
    (writes off). An empty one is an error."""
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise MixretError(f"{path}: token file not found; expected a file holding the write token")
        try:
            token, source = path.read_text(encoding="utf-8").strip(), str(path)
        except UnicodeDecodeError:
            raise MixretError(f"{path}: not UTF-8 text; expected a file holding the write token") from None
    elif "MIXRET_TOKEN" in environ:
        token, source = environ["MIXRET_TOKEN"].strip(), "MIXRET_TOKEN"
    else:
        return None
    if not token:
        raise MixretError(f"{source} is empty; expected a secret token (e.g. `openssl rand -hex 32`)")
    return token


def serve(emb_dir, model_dir=None, matcher_dir=None, host: str = "127.0.0.1", port: int = 8000,
          threads: int | None = None, max_batch: int = 64, max_wait_ms: float = 2.0, echo=print,
          token: str | None = None, **options) -> None:
    """Set the threads, load everything, and serve until interrupted (port 0: any free port; the log line
    `Uvicorn running on http://HOST:PORT` gives it). token: turns writes on (see read_token)."""
    import faiss
    import torch
    import uvicorn

    if max_batch < 1 or max_wait_ms < 0:
        raise MixretError(f"max_batch must be at least 1 and max_wait_ms at least 0, got {max_batch} and {max_wait_ms}")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    searcher = Searcher(emb_dir, model_dir, matcher_dir, writes=token is not None, **options)
    echo(f"loaded {Path(emb_dir)}: {len(searcher.ids)} texts, model {searcher.info['model']}, index "
         f"{searcher.info['index']}, matcher {searcher.info['matcher'] or '-'}, BM25 "
         f"{searcher.retriever.bm25_params.describe()} in {time.perf_counter() - start:.1f} s; "
         f"modes {', '.join(searcher.modes)}; {threads} thread(s); writes "
         f"{'on (write-ahead log ' + str(searcher.log.path) + ')' if token is not None else 'off'}")
    for mode, why in searcher.off.items():
        echo(f"mode {mode} off: {why}")
    try:
        uvicorn.run(create_app(searcher, max_batch, max_wait_ms, token), host=host, port=port, access_log=False,
                    log_level="info", workers=1)
    finally:
        searcher.close()
