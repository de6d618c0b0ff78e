"""Vector-database backends against FAISS Flat: install size, time to load N vectors, query latency, exactness.

    python scripts/bench_backend.py [--sizes 10000,100000] [--dim 128] [--queries 200] [--out docs/bench/] [--quick]

For each corpus size N (random unit vectors of --dim dimensions, inner product), each backend that is installed
loads the vectors and answers --queries single-vector queries for the top 10, one request at a time:

- faiss: the Flat index `mixret index` builds (in memory);
- milvus: Milvus Lite (pymilvus MilvusClient on a local .db file, an in-process server), a FLAT index, what
  `mixret index --backend milvus` builds;
- qdrant: Qdrant's local mode (QdrantClient(path=...)), exact search; only up to --qdrant-max vectors, as its
  local mode stores every point as its own row in SQLite and takes minutes to load 10,000.

Install size: the files of the client's distributions that mixret's own dependencies do not already bring (the
dependency closure of the client minus that of mixret), as installed here. "top 10 = faiss": the share of queries
whose ten results are FAISS Flat's. Writes OUT/backend.md and OUT/backend.json.
"""
import argparse
import importlib.metadata as md
import statistics
import tempfile
import time
from pathlib import Path

import bench_common as bc
import numpy as np
from packaging.requirements import Requirement

from mixret.retrieval.index import VectorIndex

K = 10
CLIENTS = {"milvus": ["pymilvus", "milvus-lite"], "qdrant": ["qdrant-client"]}


# -- install size -----------------------------------------------------------------------------

def closure(names) -> set[str]:
    """The distributions `names` need, themselves included (extras left out), among those installed."""
    seen, todo = set(), [n.lower() for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name.lower().replace("_", "-"))
    return seen


def installed_mib(names) -> float:
    total = 0
    for name in names:
        for f in md.distribution(name).files or []:
            path = Path(f.locate())
            if path.is_file():
                total += path.stat().st_size
    return total / 2 ** 20


def added_size(backend: str) -> tuple[float, list[str]]:
    extra = sorted(closure(CLIENTS[backend]) - closure(["mixret"]))
    return installed_mib(extra), extra


def available(backend: str) -> bool:
    try:
        md.distribution(CLIENTS[backend][0])
        return True
    except md.PackageNotFoundError:
        return False


# -- the backends -------------------------------------------------------------------------------

def faiss_backend(x: np.ndarray, _folder: Path):
    index = VectorIndex.build(x, "Flat", "ip")
    return lambda q: index.search(q[None], K)[1][0], lambda: None


def milvus_backend(x: np.ndarray, folder: Path):
    from mixret.retrieval.milvus import MilvusIndex
    index = MilvusIndex.build(x, str(folder / "bench.db"), "bench", "ip")
    return lambda q: index.search(q[None], K)[1][0], index.close


def qdrant_backend(x: np.ndarray, folder: Path):
    from qdrant_client import QdrantClient, models
    client = QdrantClient(path=str(folder / "qdrant"))
    client.create_collection("bench", vectors_config=models.VectorParams(size=x.shape[1],
                                                                         distance=models.Distance.DOT))
    for start in range(0, len(x), 5000):
        block = x[start:start + 5000]
        client.upsert("bench", points=models.Batch(ids=list(range(start, start + len(block))), vectors=block.tolist()))

    def search(q):
        hits = client.query_points("bench", query=q.tolist(), limit=K,
                                   search_params=models.SearchParams(exact=True)).points
        return np.array([h.id for h in hits])
    return search, client.close


BACKENDS = {"faiss": faiss_backend, "milvus": milvus_backend, "qdrant": qdrant_backend}


def measure(backend: str, x: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        search, close = BACKENDS[backend](x, Path(folder))
        load_s = time.perf_counter() - start
        search(queries[0])   # warm-up
        times, same = [], 0
        for q, want in zip(queries, truth):
            start = time.perf_counter()
            got = search(q)
            times.append((time.perf_counter() - start) * 1e3)
            same += np.array_equal(np.asarray(got), want)
        close()
    times.sort()
    return {"backend": backend, "docs": len(x), "load_s": load_s, "p50_ms": statistics.median(times),
            "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))], "exact": same / len(queries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_common_args(parser, "backend")
    parser.add_argument("--sizes", default="10000,100000", help="corpus sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=128, help="vector dimensions")
    parser.add_argument("--queries", type=int, default=200, help="single-vector queries timed per backend and size")
    parser.add_argument("--qdrant-max", type=int, default=10000, help="largest corpus loaded into Qdrant's local mode")
    args = parser.parse_args()
    device = bc.setup(args)
    sizes = [2000] if args.quick else [int(s) for s in args.sizes.split(",")]
    n_queries = 20 if args.quick else args.queries
    info = bc.machine_info(device)
    backends = [b for b in BACKENDS if b == "faiss" or available(b)]
    sizes_rows = []
    for b in backends[1:]:
        mib, dists = added_size(b)
        sizes_rows.append({"backend": b, "client": ", ".join(CLIENTS[b]), "added_mib": mib, "added": ", ".join(dists)})
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        x = rng.standard_normal((n, args.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        queries = rng.standard_normal((n_queries, args.dim)).astype(np.float32)
        truth = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :K]
        for b in backends:
            if b == "qdrant" and n > args.qdrant_max:
                continue
            rows.append(measure(b, x, queries, truth))
            print(rows[-1], flush=True)
    info = bc.finish_info(info)
    latency = bc.markdown_table(rows, [("backend", "backend"), ("docs", "vectors"), ("load_s", "load (s)"),
                                       ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("exact", "top 10 = faiss")])
    size = bc.markdown_table(sizes_rows, [("backend", "backend"), ("client", "client"),
                                          ("added_mib", "added install (MiB)"), ("added", "distributions added")])
    intro = (f"Random unit vectors of {args.dim} dimensions, inner product, top {K}; {n_queries} single-vector "
             f"queries, one request at a time, in this process; load = creating the index or collection and putting "
             f"every vector in it.")
    text = bc.write_report(Path(args.out), "backend", "Vector-database backends", info, intro,
                           [("Latency", latency), ("Install size", size)], {"rows": rows, "sizes": sizes_rows})
    print(text)


if __name__ == "__main__":
    main()
