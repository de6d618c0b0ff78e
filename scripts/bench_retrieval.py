"""Retrieval speed: embedding throughput per architecture and batch size, FAISS latency and recall, and the
matcher's tree search against corpus size.

    python scripts/bench_retrieval.py [--out docs/bench/] [--threads N] [--repeats 3] [--parts embed,faiss,tree]
                                      [--sizes 10000,100000] [--tree-sizes 1000,10000] [--quick]

- embed: `mixret.models.encode.encode` of --texts synthetic texts (64 to 480 bytes, random words) with randomly
  initialised models (d_model 256, 4 layers, context 512) and a ByteTokenizer; texts/s per batch size.
- faiss: --sizes clustered synthetic vectors of dim 256 (1000 Gaussian clusters, L2-normalised, inner product)
  and 1000 queries from the same clusters, indexed by `mixret.retrieval.index.VectorIndex` as Flat, HNSW32 and
  IVF{nlist},PQ32np (nlist = the power of two nearest sqrt(N), trained on at most max(64 nlist, 9984) vectors;
  "np": without FAISS's polysemous training, which search never uses and which dominates the build time;
  nprobe and efSearch are mixret's defaults). Recall@10 against the exact Flat results; ms/query with all
  queries in one call and with one query per call; build time.
- tree: `mixret.retrieval.tournament.tree_search` of one query at a time over --tree-sizes corpus vectors with a
randomly
  initialised Matcher (context 32, d_model 256, 4 layers), k=10: matcher forward passes and ms per query.

Writes OUT/retrieval.md, OUT/retrieval.json and OUT/retrieval.png (FAISS latency against recall).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import bench_common as bc
import numpy as np
import torch

from mixret.models import VARIANTS, ModelConfig, build_model
from mixret.models.encode import encode
from mixret.models.matcher import Matcher, MatcherConfig
from mixret.retrieval.index import HNSW_EF_SEARCH, IVF_NPROBE, VectorIndex
from mixret.retrieval.tournament import matcher_score_fn, tournament_passes, tree_search
from mixret.tokenizer import ByteTokenizer

EMBED_ARCHS = {"flat": "masked-mixer (flat)", "expanded": "masked-mixer (expanded)",
               "heads": "masked-mixer (4 heads)", "hypermixer": "hypermixer", "llama": "llama"}
WORDS = ("the of and to in is was for on that with as by at from his her an which this be are were it had "
         "system package install kernel driver debian release update network file server user config mount "
         "boot service module library version error report fixed patch security support window display").split()


# -- synthetic data ---------------------------------------------------------------------------

def synthetic_texts(n: int, rng: np.random.Generator, low: int = 64, high: int = 480) -> list[str]:
    """n texts of random words, each between low and high bytes long."""
    texts = []
    for _ in range(n):
        target, words = int(rng.integers(low, high + 1)), []
        while sum(len(w) + 1 for w in words) < target:
            words.append(WORDS[int(rng.integers(len(WORDS)))])
        texts.append(" ".join(words)[:target])
    return texts


def clustered_vectors(n: int, centers: np.ndarray, rng: np.random.Generator, spread: float = 0.5) -> np.ndarray:
    """n points around random centers, [n, D] float32."""
    pick = rng.integers(len(centers), size=n)
    return (centers[pick] + spread * rng.standard_normal((n, centers.shape[1]))).astype(np.float32)


# -- embedding throughput ---------------------------------------------------------------------

def bench_embed(args, device: torch.device) -> list[dict]:
    texts = synthetic_texts(args.texts, np.random.default_rng(0))
    tokenizer = ByteTokenizer()
    rows = []
    for arch in args.archs:
        torch.manual_seed(0)
        cfg = ModelConfig(**VARIANTS[EMBED_ARCHS[arch]], vocab_size=tokenizer.vocab_size, d_model=args.d_model,
                          n_layers=args.layers, context=args.embed_context)
        model = build_model(cfg).to(device).eval()
        model.tokenizer = tokenizer
        for bs in args.batch_sizes:
            seconds = bc.best_time(lambda: encode(model, texts, batch_size=bs, show_progress_bar=False,
                                                  device=device), device, args.repeats)
            rows.append({"variant": EMBED_ARCHS[arch], "batch_size": bs, "texts_s": len(texts) / seconds,
                         "ms_per_text": seconds / len(texts) * 1e3})
            print(f"embed {EMBED_ARCHS[arch]} batch {bs}: {len(texts) / seconds:.1f} texts/s", flush=True)
    return rows


# -- FAISS ------------------------------------------------------------------------------------

def ivf_factory(n: int) -> tuple[str, int]:
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    return f"IVF{nlist},PQ32np", nlist


def build_index(x: np.ndarray, factory: str, train_size: int, rng: np.random.Generator) -> VectorIndex:
    """A VectorIndex over x (already L2-normalised), trained on a sample of train_size vectors."""
    import faiss
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = x if train_size >= len(x) else x[rng.choice(len(x), train_size, replace=False)]
        index.train(sample)
    index.add(x)
    return VectorIndex(index, factory, "ip", normalize=True)


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def bench_faiss(args) -> list[dict]:
    import faiss
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((1000, args.dim)).astype(np.float32)
    queries = clustered_vectors(args.queries, centers, rng)
    rows = []
    for n in args.sizes:
        x = clustered_vectors(n, centers, rng)
        faiss.normalize_L2(x)
        ivf, nlist = ivf_factory(n)
        exact = None
        for factory in ("Flat", "HNSW32", ivf):
            start = time.perf_counter()
            index = build_index(x, factory, max(64 * nlist, 9984), rng)
            build_s = time.perf_counter() - start
            batch_s = min(_timed(lambda: index.search(queries, args.k)) for _ in range(args.repeats))
            _, found = index.search(queries, args.k)
            single = queries[:args.single_queries]
            single_s = min(_timed(lambda: [index.search(q[None], args.k) for q in single])
                           for _ in range(args.repeats))
            exact = found if factory == "Flat" else exact
            params = ({"nprobe": min(IVF_NPROBE, nlist)} if factory.startswith("IVF")
                      else {"efSearch": max(HNSW_EF_SEARCH, args.k)} if factory.startswith("HNSW") else {})
            rows.append({"vectors": n, "factory": factory, "search": ", ".join(f"{k}={v}" for k, v in params.items())
                         or "exact", "build_s": build_s, f"recall_at_{args.k}": recall_at(found, exact),
                         "batch_ms_per_query": batch_s / len(queries) * 1e3,
                         "single_ms_per_query": single_s / len(single) * 1e3})
            print(f"faiss {factory} on {n}: recall {rows[-1][f'recall_at_{args.k}']:.3f}, "
                  f"{rows[-1]['single_ms_per_query']:.3f} ms/query", flush=True)
    return rows


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- tree search ------------------------------------------------------------------------------

def bench_tree(args, device: torch.device) -> list[dict]:
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((1000, args.dim)).astype(np.float32)
    torch.manual_seed(0)
    matcher = Matcher(MatcherConfig(emb_dim=args.dim, d_model=args.d_model, n_layers=args.layers,
                                    context=args.matcher_context)).to(device).eval()
    score = matcher_score_fn(matcher)
    group = args.matcher_context - 1
    rows = []
    for n in args.tree_sizes:
        corpus = clustered_vectors(n, centers, rng)
        queries = clustered_vectors(args.tree_queries, centers, rng)
        tree_search(score, queries[0], corpus, args.k, group)  # warm-up
        best, passes = float("inf"), None
        for _ in range(args.repeats):
            bc.synchronize(device)
            start = time.perf_counter()
            passes = [tree_search(score, q, corpus, args.k, group)[2] for q in queries]
            bc.synchronize(device)
            best = min(best, time.perf_counter() - start)
        rows.append({"corpus": n, "k": args.k, "group": group, "passes": float(np.mean(passes)),
                     "formula": tournament_passes(n, args.k, group), "ms_per_query": best / len(queries) * 1e3,
                     "ms_per_pass": best / sum(passes) * 1e3})
        print(f"tree search over {n}: {rows[-1]['passes']:.0f} passes, {rows[-1]['ms_per_query']:.1f} ms/query",
              flush=True)
    return rows


def plot(faiss_rows: list[dict], k: int, path: Path, title: str) -> None:
    plt = bc.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colors = {"Flat": "tab:blue", "HNSW": "tab:orange", "IVF": "tab:green"}
    markers = dict(zip(dict.fromkeys(r["vectors"] for r in faiss_rows), "osD^v"))
    for r in faiss_rows:
        kind = next(name for name in colors if r["factory"].startswith(name))
        ax.scatter(r["single_ms_per_query"], r[f"recall_at_{k}"], color=colors[kind], marker=markers[r["vectors"]],
                   label=f"{r['factory']}, {r['vectors']:,} vectors")
    ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("ms per query (one query per call)")
    ax.set_ylabel(f"recall@{k} against exact search")
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    bc.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_common_args(parser, "retrieval")
    parser.add_argument("--parts", default="embed,faiss,tree", help="comma-separated: embed, faiss, tree")
    parser.add_argument("--archs", default=",".join(EMBED_ARCHS), help="embed: comma-separated architectures")
    parser.add_argument("--batch-sizes", default="1,8,64", help="embed: comma-separated batch sizes")
    parser.add_argument("--texts", type=int, default=128, help="embed: texts per measurement")
    parser.add_argument("--d-model", type=int, default=256, help="width of the language models and the matcher")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the language models and the matcher")
    parser.add_argument("--embed-context", type=int, default=512, help="embed: the models' context")
    parser.add_argument("--dim", type=int, default=256, help="faiss, tree: vector dimension")
    parser.add_argument("--sizes", default=None,
                        help="faiss: comma-separated corpus sizes (default: 10000,100000; 1000000 takes long)")
    parser.add_argument("--queries", type=int, default=1000, help="faiss: queries for recall and batched latency")
    parser.add_argument("--single-queries", type=int, default=200, help="faiss: queries searched one per call")
    parser.add_argument("--k", type=int, default=10, help="faiss, tree: results per query")
    parser.add_argument("--tree-sizes", default=None, help="tree: comma-separated corpus sizes (default: 1000,10000)")
    parser.add_argument("--tree-queries", type=int, default=5, help="tree: queries per corpus size")
    parser.add_argument("--matcher-context", type=int, default=32, help="tree: matcher slots (query + candidates)")
    args = parser.parse_args()
    device = bc.setup(args)
    if args.quick:
        args.archs, args.batch_sizes, args.texts, args.d_model, args.layers = "flat,llama", "1,4", 8, 32, 1
        args.embed_context, args.dim, args.queries, args.single_queries = 512, 64, 50, 10
        args.sizes, args.tree_sizes = args.sizes or "2000", args.tree_sizes or "100"
        args.tree_queries, args.repeats = 2, 1
    if args.threads:
        import faiss
        faiss.omp_set_num_threads(args.threads)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"embed", "faiss", "tree"}
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; expected embed, faiss, tree")
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if set(args.archs) - set(EMBED_ARCHS):
        parser.error(f"unknown arch(s) {sorted(set(args.archs) - set(EMBED_ARCHS))}; expected {', '.join(EMBED_ARCHS)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.sizes = [int(s) for s in (args.sizes or "10000,100000").split(",")]
    args.tree_sizes = [int(s) for s in (args.tree_sizes or "1000,10000").split(",")]

    info = bc.machine_info(device)
    embed_rows = bench_embed(args, device) if "embed" in parts else []
    faiss_rows = bench_faiss(args) if "faiss" in parts else []
    tree_rows = bench_tree(args, device) if "tree" in parts else []
    info = bc.finish_info(info)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    intro = (f"Best of {args.repeats}; models randomly initialised ({precision}, d_model={args.d_model}, "
             f"layers={args.layers}); FAISS on the CPU (faiss-cpu) with the same thread count.")
    sections = []
    if embed_rows:
        sections.append((f"Embedding throughput ({args.texts} texts of 64-480 bytes, ByteTokenizer, context "
                         f"{args.embed_context})",
                         bc.markdown_table(embed_rows, [("variant", "variant"), ("batch_size", "batch size"),
                                                        ("texts_s", "texts/s"), ("ms_per_text", "ms/text")])))
    if faiss_rows:
        sections.append((f"FAISS: recall@{args.k} and latency (dim {args.dim}, {args.queries} queries)",
                         bc.markdown_table(faiss_rows, [
                             ("vectors", "vectors"), ("factory", "index"), ("search", "search parameters"),
                             (f"recall_at_{args.k}", f"recall@{args.k}"),
                             ("single_ms_per_query", "ms/query (1 per call)"),
                             ("batch_ms_per_query", "ms/query (batched)"), ("build_s", "build s")])
                         + "\n\n![latency against recall](retrieval.png)"))
    if tree_rows:
        sections.append((f"Tree search with the matcher (context {args.matcher_context}, k={args.k}, "
                         f"{args.tree_queries} queries)",
                         bc.markdown_table(tree_rows, [("corpus", "corpus"), ("passes", "passes/query"),
                                                       ("formula", "ceil((M-k)/(G-k))"),
                                                       ("ms_per_query", "ms/query"), ("ms_per_pass", "ms/pass")])))
    text = bc.write_report(args.out, "retrieval", "Retrieval: embedding, FAISS, tree search", info, intro, sections,
                           {"args": {k: v for k, v in vars(args).items() if k not in ("out", "child")},
                            "embed": embed_rows, "faiss": faiss_rows, "tree": tree_rows})
    if faiss_rows:
        plot(faiss_rows, args.k, args.out / "retrieval.png",
             f"dim {args.dim}, clustered synthetic vectors, {info['cpu']}, {info['threads']} thread(s)")
    print(text)


if __name__ == "__main__":
    main()
