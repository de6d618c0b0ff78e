"""`mixret serve` under load: throughput and latency percentiles per mode and number of concurrent clients,
against the time of one `mixret search` command (which loads everything for each query).

    python scripts/bench_serve.py [--index EMB_DIR --matcher DIR] [--clients 1,8,32] [--requests 300]
                                  [--threads 1] [--cli-repeats 3] [--docs 8000] [--out docs/bench/] [--quick]

Without --index it builds a small setup in a temporary folder, the size of the quickstart's models but
untrained (speed does not depend on the weights): a BPE tokenizer (4,096 tokens) trained on the bundled
corpus, a masked mixer (d_model 128, 4 layers, context 256) embedding the first --docs documents (pooling
last), a Flat index, and a matcher (context 32, d_model 128, 2 layers). Queries are the corpus's summaries.

The server (`mixret serve --threads T`, a child process on a free loopback port) and this driver (httpx,
asyncio) share the machine. For each mode and client count, C clients each send single-query requests
(k=10) back to back until --requests have been answered; latency is measured by the client, from sending a
request to reading its whole response. The CLI baseline runs `mixret search QUERY --mode M` --cli-repeats
times with OMP_NUM_THREADS=T (median wall time, process start included).

Writes OUT/serve.md and OUT/serve.json.

--mixed measures writes instead (the server started with a token): search latency (vector, --mixed-clients
clients) with no writes, then while one writer adds --write-batch documents --write-rate times a second; the
throughput of adds sent back to back (documents/s, --burst requests of --burst-batch documents) against the time
of embedding and indexing the whole corpus from scratch; and the start-up of a server that replays the
write-ahead log those writes left (after a SIGKILL) against the start-up of a server on a folder without one.
Writes OUT/serve_mixed.md and OUT/serve_mixed.json.
"""
import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import bench_common as bc
import httpx
import numpy as np
import torch

from mixret import io
from mixret.data import bundled_pairs_path, load_pairs, write_pairs_jsonl

K = 10


# -- the setup --------------------------------------------------------------------------------

def build_setup(root: Path, docs: int) -> tuple[Path, Path, list[str]]:
    """(EMB_DIR, matcher folder, queries) for the first `docs` bundled pairs, with untrained models."""
    from mixret.models import ModelConfig, build_model
    from mixret.models.matcher import Matcher, MatcherConfig
    from mixret.retrieval.embeddings import embed_corpus
    from mixret.retrieval.index import VectorIndex
    from mixret.tokenizer import BPETokenizer

    pairs = load_pairs(bundled_pairs_path())[:docs]
    write_pairs_jsonl(pairs, root / "pairs.jsonl")
    torch.manual_seed(0)
    tokenizer = BPETokenizer.train([p.query for p in pairs] + [p.target for p in pairs], vocab_size=4096)
    model = build_model(ModelConfig(arch="masked-mixer", vocab_size=tokenizer.vocab_size, d_model=128, n_layers=4,
                                    context=256)).eval()
    model.tokenizer = tokenizer
    model.save_pretrained(root / "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # documents longer than the context are truncated
        embed_corpus(root / "lm", root / "pairs.jsonl", root / "emb", field="document", show_progress_bar=False)
    from mixret.retrieval.embeddings import load_emb_dir
    emb, _, _, meta = load_emb_dir(root / "emb")
    VectorIndex.build(emb, "Flat", meta={"model_hash": meta["model_hash"], "model_path": meta["model_path"]}).save(
        root / "emb")
    Matcher(MatcherConfig(emb_dim=128, d_model=128, n_layers=2, context=32,
                          embedder=io.file_hash(root / "lm" / io.WEIGHTS_NAME))).save_pretrained(root / "matcher")
    return root / "emb", root / "matcher", [p.query for p in pairs]


def queries_of(emb_dir: Path) -> list[str]:
    """Queries for a given EMB_DIR: the first words of its texts."""
    from mixret.retrieval.embeddings import load_emb_dir
    _, _, texts, _ = load_emb_dir(emb_dir)
    return [" ".join(t.split()[:8]) for t in texts if t.strip()]


def child_env(threads: int) -> dict:
    path = os.pathsep.join(filter(None, [str(bc.REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}


# -- the server and the clients ---------------------------------------------------------------

class Server:
    def __init__(self, emb_dir: Path, matcher: Path | None, threads: int, log: Path, token_file: Path | None = None):
        cmd = [sys.executable, "-m", "mixret.cli", "serve", "--index", str(emb_dir), "--port", "0",
               "--threads", str(threads)] + (["--matcher", str(matcher)] if matcher else []) + \
            (["--token-file", str(token_file)] if token_file else [])
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(threads))
        start = time.perf_counter()
        while True:
            m = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", log.read_text(errors="replace"))
            if m:
                self.url, self.startup_s = m.group(1), time.perf_counter() - start
                break
            if self.proc.poll() is not None:
                raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def load_run(url: str, mode: str, queries: list[str], clients: int, requests: int) -> dict:
    """`clients` concurrent loops of single-query requests until `requests` are answered, timed from when
    every client has opened its connection. Each client has its own httpx client and connection: one shared
    pool of many connections costs the driver more CPU per request than the server spends on it."""
    latencies, batches, next_query, ready, all_ready = [], [], iter(range(requests)), [], asyncio.Event()

    async def client(c: int):
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=1)) as http:
            await http.post("/search", json={"query": queries[-1 - c], "mode": mode, "k": K})  # warm-up
            ready.append(time.perf_counter())
            if len(ready) == clients:
                all_ready.set()
            await all_ready.wait()
            for i in next_query:
                t = time.perf_counter()
                res = await http.post("/search", json={"query": queries[i % len(queries)], "mode": mode, "k": K})
                body = res.json()
                latencies.append(time.perf_counter() - t)
                if res.status_code != 200:
                    raise SystemExit(f"{mode}: HTTP {res.status_code}: {body}")
                batches.append(body["timings"]["batch_queries"])
        return time.perf_counter()

    ends = await asyncio.gather(*(client(c) for c in range(clients)))
    wall = max(ends) - max(ready)
    ms = np.array(latencies) * 1e3
    return {"mode": mode, "clients": clients, "requests": len(latencies), "req_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_batch": float(np.mean(batches))}


async def mixed_run(url: str, queries: list[str], clients: int, requests: int, token: str, rate: float,
                    batch: int, start_id: int) -> dict:
    """Search load as in load_run (vector mode); with rate > 0, one writer adds `batch` new documents `rate`
    times a second until the searches are done."""
    done = asyncio.Event()
    write_ms, written = [], [0]

    async def writer():
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            i = start_id
            while not done.is_set():
                t = time.perf_counter()
                docs = [{"id": f"mixed-{i + j}", "text": queries[(i + j) % len(queries)] + f" (write {i + j})"}
                        for j in range(batch)]
                res = await http.post("/documents", json={"documents": docs},
                                      headers={"Authorization": f"Bearer {token}"})
                if res.status_code != 200:
                    raise SystemExit(f"write: HTTP {res.status_code}: {res.text}")
                write_ms.append((time.perf_counter() - t) * 1e3)
                written[0] += batch
                i += batch
                await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - t)))

    async def searches():
        try:
            return await load_run(url, "vector", queries, clients, requests)
        finally:
            done.set()
    start = time.perf_counter()
    if rate > 0:
        row, _ = await asyncio.gather(searches(), writer())
    else:
        row = await searches()
    wall = time.perf_counter() - start
    row.update({"write_rate": rate, "docs_written": written[0], "writes_s": len(write_ms) / wall,
                "write_p50_ms": float(np.percentile(write_ms, 50)) if write_ms else None,
                "write_p99_ms": float(np.percentile(write_ms, 99)) if write_ms else None})
    return row


async def burst(url: str, queries: list[str], token: str, requests: int, batch: int, start_id: int) -> float:
    """Documents per second of `requests` adds of `batch` new documents each, sent back to back."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        start = time.perf_counter()
        for r in range(requests):
            first = start_id + r * batch
            docs = [{"id": f"burst-{first + j}", "text": queries[(first + j) % len(queries)] + f" (burst {first + j})"}
                    for j in range(batch)]
            res = await http.post("/documents", json={"documents": docs}, headers={"Authorization": f"Bearer {token}"})
            if res.status_code != 200:
                raise SystemExit(f"write: HTTP {res.status_code}: {res.text}")
        return requests * batch / (time.perf_counter() - start)


def rebuild_seconds(emb_dir: Path, threads: int) -> float:
    """Embedding and indexing the folder's whole corpus from scratch (mixret embed + mixret index, one process)."""
    import json

    from mixret.retrieval.embeddings import embed_corpus, load_emb_dir
    from mixret.retrieval.index import VectorIndex
    _, ids, texts, meta = load_emb_dir(emb_dir)
    with tempfile.TemporaryDirectory(prefix="bench-rebuild-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts)))
        torch.set_num_threads(threads)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            embed_corpus(meta["model_path"], corpus, Path(tmp) / "emb", show_progress_bar=False)
        emb, *_ = load_emb_dir(Path(tmp) / "emb")
        VectorIndex.build(emb, "Flat").save(Path(tmp) / "emb")
        return time.perf_counter() - start


def mixed(args, emb_dir: Path, queries: list[str], tmp: Path, info: dict) -> None:
    import shutil
    folder = tmp / "emb-writes"
    shutil.copytree(emb_dir, folder)
    token = "bench-token"
    (tmp / "token").write_text(token)
    server = Server(folder, None, args.threads, tmp / "mixed.log", tmp / "token")
    clean_startup = server.startup_s
    rows, next_id = [], 0
    try:
        size = httpx.get(server.url + "/health", timeout=60).json()["corpus_size"]
        for rate in (0.0, *args.write_rates):
            row = asyncio.run(mixed_run(server.url, queries, args.mixed_clients, args.requests, token, rate,
                                        args.write_batch, next_id))
            next_id += row["docs_written"]
            rows.append(row)
            print(f"writes {rate}/s: search p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms; "
                  f"{row['docs_written']} documents written", flush=True)
        docs_s = asyncio.run(burst(server.url, queries, token, args.burst, args.burst_batch, next_id))
        health = httpx.get(server.url + "/health", timeout=60).json()
        print(f"adds back to back: {docs_s:.1f} documents/s", flush=True)
    finally:
        server.proc.kill()       # SIGKILL: the log stays as it is, for the restart below
        server.proc.wait(30)
    log_lines = len((folder / "writes.wal").read_bytes().splitlines())
    restarted = Server(folder, None, args.threads, tmp / "restart.log", tmp / "token")
    replay_startup = restarted.startup_s
    restarted.stop()
    rebuild_s = rebuild_seconds(emb_dir, args.threads)
    info = bc.finish_info(info)
    table = bc.markdown_table(rows, [("write_rate", "writes/s asked"), ("writes_s", "writes/s done"),
                                     ("docs_written", "documents written"), ("req_s", "searches/s"),
                                     ("p50_ms", "search p50 ms"), ("p99_ms", "search p99 ms"),
                                     ("write_p50_ms", "write p50 ms"), ("write_p99_ms", "write p99 ms")])
    adds = bc.markdown_table([{"docs_s": docs_s, "batch": args.burst_batch, "rebuild_s": rebuild_s,
                               "corpus": size, "rebuild_docs_s": size / rebuild_s}],
                             [("batch", "documents a request"), ("docs_s", "adds, documents/s"),
                              ("corpus", "corpus"), ("rebuild_s", "rebuild from scratch (s)"),
                              ("rebuild_docs_s", "rebuild, documents/s")])
    restart = bc.markdown_table([{"clean": clean_startup, "lines": log_lines, "replay": replay_startup,
                                  "size": health["corpus_size"]}],
                                [("clean", "start-up, no log (s)"), ("lines", "log lines"),
                                 ("size", "corpus after replay"), ("replay", "start-up replaying the log (s)")])
    intro = (f"`mixret serve --threads {args.threads} --token-file ...` on {size} bundled documents (the setup of "
             f"serve.md), vector search by {args.mixed_clients} clients, {args.requests} requests a row, while one "
             f"writer adds {args.write_batch} document(s) per request at the rate asked (0: no writes). Every write is "
             f"embedded, flushed to the write-ahead log and swapped in (Flat index and BM25 rebuilt) before its "
             f"answer. Server, writer and search clients share the machine.")
    text = bc.write_report(args.out, "serve_mixed", "mixret serve: searches during writes", info, intro,
                           [("Search latency during writes", table), ("Add throughput", adds),
                            ("Restart", restart)],
                           {"rows": rows, "adds_docs_s": docs_s, "rebuild_s": rebuild_s, "corpus": size,
                            "startup_clean_s": clean_startup, "startup_replay_s": replay_startup,
                            "log_lines": log_lines})
    print(text)


def cli_seconds(emb_dir: Path, matcher: Path | None, mode: str, query: str, threads: int, repeats: int) -> float:
    """Median wall time of `mixret search QUERY --mode MODE` as a fresh process."""
    cmd = [sys.executable, "-m", "mixret.cli", "search", query, "--index", str(emb_dir), "--mode", mode,
           "-k", str(K)] + (["--matcher", str(matcher)] if matcher else [])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads))
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"mixret search --mode {mode} failed: {proc.stderr[-500:]}")
    return statistics.median(times)


# -- main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder for serve.md/.json")
    parser.add_argument("--index", type=Path, default=None, help="EMB_DIR to serve (default: build a small one)")
    parser.add_argument("--matcher", type=Path, default=None, help="matcher folder, with --index")
    parser.add_argument("--docs", type=int, default=8000, help="documents of the built setup")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=300, help="requests per mode and client count")
    parser.add_argument("--threads", type=int, default=1, help="torch/FAISS threads of the server and the CLI")
    parser.add_argument("--cli-repeats", type=int, default=3, help="runs of `mixret search` per mode")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds in all (a smoke test)")
    parser.add_argument("--mixed", action="store_true", help="measure searches during writes instead (see above)")
    parser.add_argument("--mixed-clients", type=int, default=4, help="--mixed: concurrent search clients")
    parser.add_argument("--write-rates", default="2,10", help="--mixed: writes a second, comma-separated")
    parser.add_argument("--write-batch", type=int, default=1, help="--mixed: documents a write")
    parser.add_argument("--burst", type=int, default=20, help="--mixed: adds sent back to back")
    parser.add_argument("--burst-batch", type=int, default=50, help="--mixed: documents an add of the burst")
    args = parser.parse_args()
    args.write_rates = [float(r) for r in args.write_rates.split(",")]
    if args.quick:
        args.docs, args.clients, args.requests, args.cli_repeats = 200, "1,4", 20, 1
        args.burst, args.burst_batch = 3, 10
    clients = [int(c) for c in args.clients.split(",")]
    torch.set_num_threads(args.threads)
    info = bc.machine_info(torch.device("cpu"))
    info["threads"] = args.threads

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        if args.index is None:
            start = time.perf_counter()
            emb_dir, matcher, queries = build_setup(tmp, args.docs)
            print(f"setup: {args.docs} documents embedded and indexed in {time.perf_counter() - start:.0f} s",
                  flush=True)
        else:
            emb_dir, matcher, queries = args.index, args.matcher, queries_of(args.index)
        if args.mixed:
            return mixed(args, emb_dir, queries, tmp, info)
        server = Server(emb_dir, matcher, args.threads, tmp / "server.log")
        try:
            health = httpx.get(server.url + "/health", timeout=60).json()
            print(f"server up in {server.startup_s:.1f} s: {health['corpus_size']} texts, modes "
                  f"{', '.join(health['modes'])}", flush=True)
            rows = []
            for mode in health["modes"]:
                for c in clients:
                    row = asyncio.run(load_run(server.url, mode, queries, c, args.requests))
                    rows.append(row)
                    print(f"{mode}, {c} clients: {row['req_s']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, "
                          f"p99 {row['p99_ms']:.1f} ms, mean batch {row['mean_batch']:.1f}", flush=True)
        finally:
            server.stop()
        cli = {}
        for mode in health["modes"]:
            cli[mode] = cli_seconds(emb_dir, matcher, mode, queries[0], args.threads, args.cli_repeats)
            print(f"mixret search --mode {mode}: {cli[mode]:.2f} s", flush=True)
    for row in rows:
        row["cli_s"] = cli[row["mode"]]
        row["speedup"] = cli[row["mode"]] * row["req_s"]  # queries answered by the server in one CLI query's time
    info = bc.finish_info(info)

    setup = (f"`--index {args.index}`" if args.index else
             f"{health['corpus_size']} bundled documents; untrained masked mixer (d_model 128, 4 layers, context 256, "
             f"BPE 4,096), Flat index, untrained matcher (context 32, d_model 128, 2 layers)")
    intro = f"""
`mixret serve --threads {args.threads}` on {setup}. Server and load driver (httpx, asyncio) on the same
machine; each client sends one query (k={K}) at a time, back to back, {args.requests} requests per row;
latency is measured by the client. Server start-up (load model, index, BM25, matcher; probe every mode):
{server.startup_s:.1f} s. `mixret search` column: one CLI query as a fresh process, median of
{args.cli_repeats} (OMP_NUM_THREADS={args.threads}). "x CLI" = queries the server answers in the time of
one CLI query (req/s x CLI s).
"""
    intro = textwrap.fill(" ".join(intro.split()), 110)
    table = bc.markdown_table(rows, [("mode", "mode"), ("clients", "clients"), ("req_s", "req/s"),
                                     ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"),
                                     ("mean_batch", "mean batch"), ("cli_s", "`mixret search` s"),
                                     ("speedup", "x CLI")])
    text = bc.write_report(args.out, "serve", "mixret serve under load", info, intro,
                           [("Throughput and latency", table)],
                           {"rows": rows, "cli_s": cli, "startup_s": server.startup_s, "setup": setup})
    print(text)


if __name__ == "__main__":
    main()
