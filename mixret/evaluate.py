"""Retrieval evaluation: every test query against the whole corpus of the test targets.

The corpus is the distinct target texts of the pairs; each query has one relevant document, its own
target. Metrics (R@1, R@10, MRR@10, nDCG@10) are computed with ranx from the ranked lists each search
mode returns; ranx sees scores derived from the ranks, so its tie-breaking never reorders a ranking.
queries/s counts the time to embed the queries (for the modes that use embeddings) and to search;
embedding the corpus and building its indexes is done once, before, and not counted.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from mixret.errors import MixretError
from mixret.search import MODES, SHORTLIST_SOURCES, Retriever

METRICS = {"R@1": "recall@1", "R@10": "recall@10", "MRR@10": "mrr@10", "nDCG@10": "ndcg@10"}
EVAL_MODES = MODES + ("all",)
MATCHER_MODES = ("tree", "hybrid")
K = 10  # depth of every ranking: the deepest metric cut-off


def ir_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """R@1, R@10, MRR@10 and nDCG@10 averaged over the queries of qrels (a query missing from run scores 0)."""
    from ranx import Qrels, Run, evaluate

    if not qrels:
        raise MixretError("no queries to evaluate")
    scores = evaluate(Qrels(qrels), Run(run), list(METRICS.values()), make_comparable=True)
    return {name: float(scores[ranx_name]) for name, ranx_name in METRICS.items()}


def resolve_modes(mode: str | Sequence[str], have_matcher: bool, have_fusion: bool = False) -> list[str]:
    """"all" -> vector, bm25, with a fusion weight fusion, and with a matcher tree and hybrid; a mode needing a
    matcher without one is an error."""
    modes = [mode] if isinstance(mode, str) else list(mode)
    if "all" in modes:
        return (["vector"] + (["fusion"] if have_fusion else []) + ["bm25"]
                + (list(MATCHER_MODES) if have_matcher else []))
    for m in modes:
        if m not in MODES:
            raise MixretError(f"unknown mode {m!r}; expected one of {', '.join(EVAL_MODES)}")
        if m in MATCHER_MODES and not have_matcher:
            raise MixretError(f"mode {m} ranks with a matcher: pass --matcher DIR")
    return modes


def corpus_and_qrels(pairs: Sequence) -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """(query texts, distinct target texts, qrels): query i is "q{i}", distinct target j is "d{j}"."""
    doc_of: dict[str, int] = {}
    qrels = {}
    for i, p in enumerate(pairs):
        j = doc_of.setdefault(p.target, len(doc_of))
        qrels[f"q{i}"] = {f"d{j}": 1}
    return [p.query for p in pairs], list(doc_of), qrels


def run_from(indices: np.ndarray) -> dict[str, dict[str, float]]:
    """Ranked corpus rows [Q, k] (-1 = none) -> ranx run with score k - rank."""
    k = indices.shape[1]
    return {f"q{i}": {f"d{j}": float(k - r) for r, j in enumerate(row) if j >= 0}
            for i, row in enumerate(indices.tolist())}


def evaluate_pairs(pairs: Sequence, model=None, matcher=None, modes: str | Sequence[str] = "vector",
                   shortlist: int = 256, shortlist_from: str = "vector", limit: int | None = None,
                   batch_size: int = 64, pooling: str = "last", fusion=None) -> dict:
    """Search every query of `pairs` (the first `limit`) among all their distinct targets in each mode.

    model: anything with `encode(texts, batch_size=..., pooling=...) -> [N, E]` (a mixret language model),
    needed by every mode but bm25; pooling: as for `mixret.embed.encode` (embed the texts the way the
    matcher's training pairs were); matcher: a mixret Matcher, needed by tree and hybrid; fusion: a
    mixret.fusion.Fusion, needed by fusion. Returns a report dict
    with the corpus facts, chance levels and, per mode, the metrics, queries/s and matcher passes/query; with
    hybrid, "shortlist_order" holds the metrics of its shortlist in the source's own order, what the matcher's
    ranking must beat.
    """
    modes = resolve_modes(modes, matcher is not None, fusion is not None)
    if shortlist_from not in SHORTLIST_SOURCES:
        raise MixretError(f"unknown shortlist source {shortlist_from!r}; expected vector or bm25")
    if limit is not None and limit < 1:
        raise MixretError(f"--limit must be a positive number of queries, got {limit}")
    queries, docs, qrels = corpus_and_qrels(pairs)
    if not queries:
        raise MixretError("no pairs to evaluate")
    n = len(queries) if limit is None else min(limit, len(queries))
    queries, qrels = queries[:n], {f"q{i}": qrels[f"q{i}"] for i in range(n)}
    k = min(K, len(docs))
    needs_emb = any(m != "bm25" for m in modes)
    if needs_emb and model is None:
        raise MixretError(f"mode(s) {', '.join(m for m in modes if m != 'bm25')} embed the texts: pass --model DIR")

    corpus_emb = query_emb = None
    embed_seconds = 0.0
    if needs_emb:
        start = time.perf_counter()
        corpus_emb = np.asarray(model.encode(docs, batch_size=batch_size, pooling=pooling), dtype=np.float32)
        corpus_seconds = time.perf_counter() - start
        start = time.perf_counter()
        query_emb = np.asarray(model.encode(queries, batch_size=batch_size, pooling=pooling), dtype=np.float32)
        embed_seconds = time.perf_counter() - start
    else:
        corpus_seconds = 0.0
    retriever = Retriever(corpus_emb, docs, matcher=matcher, fusion=fusion)
    report = {
        "n_queries": n, "corpus_size": len(docs), "k": k, "pooling": pooling if needs_emb else None,
        "shortlist": min(shortlist, len(docs)) if "hybrid" in modes else None,
        "shortlist_from": shortlist_from if "hybrid" in modes else None,
        "matcher_context": matcher.config.context if matcher is not None else None,
        "fusion": fusion.to_dict() if fusion is not None and "fusion" in modes else None,
        "chance": {"R@1": 1 / len(docs), "R@10": k / len(docs)},
        "corpus_embed_seconds": corpus_seconds, "query_embed_seconds": embed_seconds,
        "modes": {},
    }
    for mode in modes:
        result = retriever.search(mode, k, query_emb=query_emb, queries=queries, shortlist=shortlist,
                                  shortlist_from=shortlist_from)
        seconds = result.seconds + (embed_seconds if mode != "bm25" else 0.0)
        report["modes"][mode] = {
            **ir_metrics(qrels, run_from(result.indices)),
            "queries_per_s": n / seconds if seconds > 0 else None,
            "seconds": seconds,
            "passes_per_query": float(result.passes.mean()) if mode in MATCHER_MODES else None,
        }
    if "hybrid" in modes:
        source = retriever.search(shortlist_from, k, query_emb=query_emb, queries=queries)
        report["shortlist_order"] = ir_metrics(qrels, run_from(source.indices))
    return report


def format_table(report: dict) -> str:
    """Markdown comparison table of a report from evaluate_pairs, one row per mode, chance last."""
    cols = list(METRICS)
    lines = ["| mode | " + " | ".join(cols) + " | queries/s | matcher passes/query |",
             "|---|" + "---:|" * (len(cols) + 2)]
    for mode, m in report["modes"].items():
        passes = f"{m['passes_per_query']:.1f}" if m["passes_per_query"] is not None else "-"
        speed = f"{m['queries_per_s']:.1f}" if m["queries_per_s"] is not None else "-"
        lines.append(f"| {mode} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + f" | {speed} | {passes} |")
        if mode == "hybrid" and report.get("shortlist_order"):
            m = report["shortlist_order"]
            lines.append(f"| hybrid's shortlist, {report['shortlist_from']} order | "
                         + " | ".join(f"{m[c]:.3f}" for c in cols) + " | - | - |")
    chance = report["chance"]
    lines.append("| chance | " + " | ".join(f"{chance[c]:.3f}" if c in chance else "-" for c in cols) + " | - | - |")
    head = (f"{report['n_queries']} queries against {report['corpus_size']} documents"
            + (f"; hybrid shortlist {report['shortlist']} from {report['shortlist_from']}"
               if report.get("shortlist") else "")
            + (f"; matcher context {report['matcher_context']}" if report.get("matcher_context") else "")
            + (f"; fusion weight {report['fusion']['weight']:.2f} ({report['fusion']['method']})"
               if report.get("fusion") else ""))
    return head + "\n\n" + "\n".join(lines)
