"""Retrieval evaluation: every test query against the whole corpus of the test targets.

The corpus is the distinct target texts of the pairs; each query has one relevant document, its own
target. A query text that repeats an earlier pair's query is dropped (as `train-matcher` drops it), and
the report says how many were. Metrics (R@1, R@10, MRR@10, nDCG@10) are computed with ranx from the
ranked lists each search mode returns; ranx sees scores derived from the ranks, so its tie-breaking
never reorders a ranking. queries/s counts the time to embed the queries (for the modes that use
embeddings) and to search; embedding the corpus and building its indexes is done once, before, and not
counted.

tfidf (mixret.retrieval.tfidf) is the second lexical baseline, with nothing fitted: like bm25 it needs no model.

When bm25 is among the modes, every other mode (tfidf too) is compared with it query by query: the queries it ranks
first that BM25 does not (wins), the reverse (losses), and the exact two-sided McNemar p-value of that
difference (a binomial test on the discordant queries, scipy.stats.binomtest). A mode is clearly better than
BM25 only where p is small (below 0.05, say), not merely where its R@1 is higher. BM25 is the one fitted with
the model when its k1, b and stemmer are given (mixret.retrieval.bm25) and differ from the defaults; then the default
BM25 is reported beside it ("bm25_default"), compared with the fitted one the same way.

Ties are pessimistic: the relevant document is ranked after every document that scores the same as it
(see `mixret.retrieval.search`: each search gets the relevant documents as `losers`). A model that gives every
document the same score therefore finds nothing (R@1 = 0), rather than whatever the search library's
order of equal scores happens to favour.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mixret import io
from mixret.data import BUNDLED_TEST_FRACTION, drop_repeated_queries, file_hash, load_pairs, split_pairs
from mixret.errors import MixretError
from mixret.models.encode import POOLINGS, resolve_spec
from mixret.options import nested, option
from mixret.retrieval.bm25 import BM25_NAME, BM25Params, load_bm25, model_bm25
from mixret.retrieval.embeddings import default_model_dir, load_matcher_checked, load_model_checked, matcher_spec
from mixret.retrieval.fusion import load_fusion
from mixret.retrieval.search import LEXICAL_MODES, MODES, SHORTLIST_SOURCES, RetrievalConfig, Retriever

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


def held_out_split(pairs_path, trainers: dict[str, list | None], test_fraction: float | None = None
                   ) -> tuple[float | None, str, list[str]]:
    """Which pairs of the file to score, from what trained the models that score them.

    trainers maps a name ("model runs/mm") to its `trained_on` record (mixret.data.sources_record; None when
    it records none). Returns (test fraction, or None to score every pair; a sentence saying which and why;
    warnings). A file that none of them was trained on is scored whole; one they were trained on is scored
    on its test split (the smallest fraction recorded, which every model held out); when a model records
    nothing, the default test split is scored, to be safe. An explicit test_fraction is used as given, with a
    warning when it reaches into a training split. A model trained on every pair of the file is a warning:
    nothing in that file is held out from it.
    """

    digest = file_hash(pairs_path)
    fractions, unknown, whole, warnings = {}, [], [], []
    for name, record in trainers.items():
        if record is None:
            unknown.append(name)
            continue
        for entry in record:
            if entry.get("hash") == digest:
                if entry.get("split") == "train":
                    fractions[name] = float(entry["test_fraction"])
                else:
                    whole.append(name)
    for name in whole:
        warnings.append(f"{name} was trained on every pair of {pairs_path}: no pair of it is held out from it, "
                        "so its scores here measure text it has seen")
    if test_fraction is not None:
        reaching = [f"{n} (test fraction {f:g})" for n, f in fractions.items() if f < test_fraction]
        if reaching:
            warnings.append(f"--test-fraction {test_fraction:g} scores pairs that {', '.join(reaching)} trained on")
        return test_fraction, f"the test split of {pairs_path} (--test-fraction {test_fraction:g})", warnings
    if fractions:
        f = min(fractions.values())
        return f, (f"the test split of {pairs_path} (test fraction {f:g}): "
                   f"{', '.join(fractions)} trained on the rest of it"), warnings
    if unknown:
        f = BUNDLED_TEST_FRACTION
        return f, (f"the test split of {pairs_path} (test fraction {f:g}): {', '.join(unknown)} records no "
                   "training data, so the pairs it may have seen are left out"), warnings
    users = ", ".join(trainers) if trainers else "no trained model (bm25 only)"
    return None, (f"every pair of {pairs_path}: it trained none of {users}" if trainers else
                  f"every pair of {pairs_path}: {users}"), warnings


def resolve_modes(mode: str | Sequence[str], have_matcher: bool, have_fusion: bool = False) -> list[str]:
    """"all" -> vector, bm25, tfidf, with a fusion weight fusion, and with a matcher tree and hybrid; a mode needing
    a matcher without one is an error."""
    modes = [mode] if isinstance(mode, str) else list(mode)
    if "all" in modes:
        return (["vector"] + (["fusion"] if have_fusion else []) + ["bm25", "tfidf"]
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


def paired_top1(hits: np.ndarray, baseline: np.ndarray) -> dict:
    """Per-query top-1 hits [Q] bool of a mode and of a baseline -> {"wins", "losses", "p"}: the queries only the
    mode gets right, those only the baseline gets right, and the exact two-sided McNemar p-value (1.0 when the
    two never disagree)."""
    from scipy.stats import binomtest
    wins, losses = int((hits & ~baseline).sum()), int((~hits & baseline).sum())
    p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "p": float(p)}


def run_from(indices: np.ndarray) -> dict[str, dict[str, float]]:
    """Ranked corpus rows [Q, k] (-1 = none) -> ranx run with score k - rank."""
    k = indices.shape[1]
    return {f"q{i}": {f"d{j}": float(k - r) for r, j in enumerate(row) if j >= 0}
            for i, row in enumerate(indices.tolist())}


def evaluate_pairs(pairs: Sequence, model=None, matcher=None, modes: str | Sequence[str] = "vector",
                   shortlist: int = 256, shortlist_from: str = "vector", limit: int | None = None,
                   batch_size: int = 64, pooling: str | None = None, max_length: int | None = None,
                   fusion=None, bm25_params=None) -> dict:
    """Search every query of `pairs` (the first `limit`) among all their distinct targets in each mode.

    model: anything with `encode(texts, batch_size=..., pooling=..., max_length=...) -> [N, E]` (a mixret
    language model), needed by every mode but bm25 and tfidf; pooling, max_length: as for
    `mixret.models.encode.encode` (embed the texts the way the matcher's training pairs were: see
    mixret.models.encode.resolve_spec); matcher: a mixret Matcher, needed by tree and hybrid (and ignored by the
    other modes); fusion: a mixret.retrieval.fusion.Fusion, needed by fusion; bm25_params: a
    mixret.retrieval.bm25.BM25Params for bm25, fusion and a bm25 shortlist (default: the defaults; a matcher's bm25
    feature always keeps them). Pairs repeating an earlier query are dropped
    (drop_repeated_queries). Returns a report dict with the corpus facts, chance levels, the BM25 parameters
    used and, per mode, the metrics, queries/s and matcher passes/query; with
    hybrid, "shortlist_order" holds the metrics of its shortlist in the source's own order, what the matcher's
    ranking must beat. With bm25 among the modes, each other mode has "vs_bm25": paired_top1 against BM25.
    """
    modes = resolve_modes(modes, matcher is not None, fusion is not None)
    if shortlist_from not in SHORTLIST_SOURCES:
        raise MixretError(f"unknown shortlist source {shortlist_from!r}; expected vector or bm25")
    if limit is not None and limit < 1:
        raise MixretError(f"--limit must be a positive number of queries, got {limit}")
    pairs, n_repeated = drop_repeated_queries(pairs)
    queries, docs, qrels = corpus_and_qrels(pairs)
    if not queries:
        raise MixretError("no pairs to evaluate")
    n = len(queries) if limit is None else min(limit, len(queries))
    queries, qrels = queries[:n], {f"q{i}": qrels[f"q{i}"] for i in range(n)}
    gold = np.array([int(next(iter(qrels[f"q{i}"]))[1:]) for i in range(n)], dtype=np.int64)  # "d{j}" -> j
    k = min(K, len(docs))
    needs_emb = any(m not in LEXICAL_MODES for m in modes)
    if needs_emb and model is None:
        raise MixretError(f"mode(s) {', '.join(m for m in modes if m not in LEXICAL_MODES)} embed the texts: "
                          f"pass --model DIR")

    corpus_emb = query_emb = None
    embed_seconds = 0.0
    if needs_emb:
        start = time.perf_counter()
        corpus_emb = np.asarray(model.encode(docs, batch_size=batch_size, pooling=pooling, max_length=max_length),
                                dtype=np.float32)
        corpus_seconds = time.perf_counter() - start
        start = time.perf_counter()
        query_emb = np.asarray(model.encode(queries, batch_size=batch_size, pooling=pooling, max_length=max_length),
                               dtype=np.float32)
        embed_seconds = time.perf_counter() - start
    else:
        corpus_seconds = 0.0
    uses_matcher = any(m in MATCHER_MODES for m in modes)
    retriever = Retriever(corpus_emb, docs, matcher=matcher if uses_matcher else None,
                          fusion=fusion if "fusion" in modes else None, bm25_params=bm25_params)
    report = {
        "n_queries": n, "repeated_queries_dropped": n_repeated, "corpus_size": len(docs), "k": k,
        "ties": "pessimistic",
        "pooling": (pooling or getattr(model, "embedding_defaults", {}).get("pooling", "last")) if needs_emb else None,
        "max_length": max_length if needs_emb else None,
        "shortlist": min(shortlist, len(docs)) if "hybrid" in modes else None,
        "shortlist_from": shortlist_from if "hybrid" in modes else None,
        "matcher_context": matcher.config.context if uses_matcher else None,
        "fusion": fusion.to_dict() if fusion is not None and "fusion" in modes else None,
        "bm25": _bm25_record(bm25_params) if uses_bm25(modes, shortlist_from) else None,
        "chance": {"R@1": 1 / len(docs), "R@10": k / len(docs)},
        "corpus_embed_seconds": corpus_seconds, "query_embed_seconds": embed_seconds,
        "modes": {},
    }
    hits, rankings = {}, {}
    for mode in modes:
        result = retriever.search(mode, k, query_emb=query_emb, queries=queries, shortlist=shortlist,
                                  shortlist_from=shortlist_from, losers=gold)
        hits[mode], rankings[mode] = result.indices[:, 0] == gold, result.indices
        seconds = result.seconds + (embed_seconds if mode not in LEXICAL_MODES else 0.0)
        report["modes"][mode] = {
            **ir_metrics(qrels, run_from(result.indices)),
            "queries_per_s": n / seconds if seconds > 0 else None,
            "seconds": seconds,
            "passes_per_query": float(result.passes.mean()) if mode in MATCHER_MODES else None,
        }
    if "bm25" in hits:
        for mode in hits:
            if mode != "bm25":
                report["modes"][mode]["vs_bm25"] = paired_top1(hits[mode], hits["bm25"])
        if bm25_params is not None and not bm25_params.is_default:
            report["bm25_default"] = default_bm25_row(docs, queries, qrels, gold, k, hits["bm25"])
    if "hybrid" in modes:
        source = rankings.get(shortlist_from)
        if source is None:
            source = retriever.search(shortlist_from, k, query_emb=query_emb, queries=queries, losers=gold).indices
        report["shortlist_order"] = ir_metrics(qrels, run_from(source))
    return report


def default_bm25_row(docs: list[str], queries: list[str], qrels: dict, gold: np.ndarray, k: int,
                     fitted_hits: np.ndarray) -> dict:
    """The metrics of BM25 with its default parameters, beside a fitted one whose top-1 hits [Q] are given: what
    the fit gained, with "vs_bm25" the default's won/lost against the fitted BM25."""
    result = Retriever(None, docs).search("bm25", k, queries=queries, losers=gold)
    return {**ir_metrics(qrels, run_from(result.indices)),
            "queries_per_s": len(queries) / result.seconds if result.seconds > 0 else None,
            "seconds": result.seconds, "passes_per_query": None,
            "vs_bm25": paired_top1(result.indices[:, 0] == gold, fitted_hits)}


def uses_bm25(modes: Sequence[str], shortlist_from: str = "vector") -> bool:
    """Whether any of the modes searches with BM25 (bm25, fusion, or hybrid with a bm25 shortlist)."""
    return any(m in ("bm25", "fusion") or (m == "hybrid" and shortlist_from == "bm25") for m in modes)


def _bm25_record(params) -> dict:
    """k1, b and stemmer of a BM25Params (None: the defaults), and whether they were fitted."""
    params = params if params is not None else BM25Params()
    return {"k1": params.k1, "b": params.b, "stemmer": params.stemmer, "fitted": bool(params.fitted)}


def format_table(report: dict) -> str:
    """Markdown comparison table of a report from evaluate_pairs, one row per mode, chance last."""
    cols = list(METRICS)
    paired = any("vs_bm25" in m for m in report["modes"].values()) or bool(report.get("bm25_default"))
    extra = " top-1 vs bm25: won/lost (p) |" if paired else ""
    lines = ["| mode | " + " | ".join(cols) + " | queries/s | matcher passes/query |" + extra,
             "|---|" + "---:|" * (len(cols) + 2 + paired)]
    blank = " - |" if paired else ""
    for mode, m in report["modes"].items():
        passes = f"{m['passes_per_query']:.1f}" if m["passes_per_query"] is not None else "-"
        speed = f"{m['queries_per_s']:.1f}" if m["queries_per_s"] is not None else "-"
        versus = f" {format_paired(m['vs_bm25'])} |" if "vs_bm25" in m else blank
        lines.append(f"| {mode} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + f" | {speed} | {passes} |" + versus)
        if mode == "bm25" and report.get("bm25_default"):
            m = report["bm25_default"]
            speed = f"{m['queries_per_s']:.1f}" if m["queries_per_s"] is not None else "-"
            lines.append("| bm25, defaults (k1 1.5, b 0.75, stemmed) | " + " | ".join(f"{m[c]:.3f}" for c in cols)
                         + f" | {speed} | - | {format_paired(m['vs_bm25'])} |")
        if mode == "hybrid" and report.get("shortlist_order"):
            m = report["shortlist_order"]
            lines.append(f"| hybrid's shortlist, {report['shortlist_from']} order | "
                         + " | ".join(f"{m[c]:.3f}" for c in cols) + " | - | - |" + blank)
    chance = report["chance"]
    lines.append("| chance | " + " | ".join(f"{chance[c]:.3f}" if c in chance else "-" for c in cols) + " | - | - |"
                 + blank)
    head = (f"{report['n_queries']} queries against {report['corpus_size']} documents"
            + (f"; hybrid shortlist {report['shortlist']} from {report['shortlist_from']}"
               if report.get("shortlist") else "")
            + (f"; matcher context {report['matcher_context']}" if report.get("matcher_context") else "")
            + (f"; fusion weight {report['fusion']['weight']:.2f} ({report['fusion']['method']})"
               if report.get("fusion") else "")
            + (f"; {_bm25_line(report['bm25'])}" if report.get("bm25") else ""))
    return head + "\n\n" + "\n".join(lines)


def _bm25_line(b: dict) -> str:
    """"BM25 k1 0.9, b 0.5, stemmer on (fitted)" from a report's bm25 record."""
    return (f"BM25 k1 {b['k1']:g}, b {b['b']:g}, stemmer {'on' if b['stemmer'] else 'off'} "
            f"({'fitted' if b['fitted'] else 'defaults'})")


def format_paired(v: dict) -> str:
    """A paired_top1 result as "+41/-18 (p 0.003)"."""
    return f"+{v['wins']}/-{v['losses']} (p {v['p']:.2g})"


@dataclass
class EvaluateConfig:
    """Everything `mixret evaluate` takes: `evaluate(EvaluateConfig(pairs=...))` is the command."""
    pairs: str | None = option(None, "Pairs file: .jsonl, .jsonl.gz, .parquet or TinyStoriesInstruct .txt.",
                               show="required")
    mode: str = option("all", "all: vector, bm25, tfidf, fusion when the model has a fusion weight (from `mixret "
                              "finetune`) and, with --matcher, tree and hybrid. With bm25 among them, each other mode "
                              "is compared with it query by query (top-1 won/lost and an exact McNemar p-value).",
                       choices=EVAL_MODES)
    limit: int | None = option(None, "Evaluate the first Q queries (the corpus stays whole).")
    query_field: str = option("summary", "Pairs field with the queries.")
    target_field: str = option("document", "Pairs field with the targets.")
    test_fraction: float | None = option(None, "Score the hash test split of this fraction.",
                                         show="every pair of a file that trained none of the models, the test split "
                                              "of one that did (as recorded in them)")
    batch_size: int = option(64, "Texts per embedding forward pass.")
    pooling: str | None = option(None, "How texts are embedded, as in `mixret embed`; one that differs from the "
                                       "matcher's is refused.", choices=POOLINGS,
                                 show="as the matcher's training pairs were, else the model's own, else last")
    out: str | None = option(None, "Write the report as JSON to this file.")
    retrieval: RetrievalConfig = nested(RetrievalConfig, "the model, matcher and modes")


def evaluate(cfg: EvaluateConfig, say: Callable[[str], None] = lambda m: None) -> dict:
    """What `mixret evaluate` does -> the report (also written to cfg.out): the pairs file's held-out pairs (what
    trained none of the models, as they record it; data.load_split's dropping of repeated queries), each mode's
    IR metrics, and which pairs were scored and why (said, with the BM25 parameters used)."""
    r = cfg.retrieval
    if not cfg.pairs:
        raise MixretError("evaluate needs a pairs file (--pairs)")
    model_dir = r.model
    if cfg.mode not in LEXICAL_MODES and model_dir is None:
        model_dir = str(default_model_dir())
    fusion = load_fusion(model_dir, r.fusion_weight) if cfg.mode in ("fusion", "all") else None
    modes = resolve_modes(cfg.mode, r.matcher is not None, fusion is not None)
    if cfg.mode == "all" and r.matcher is None:
        say("tree and hybrid skipped: they need --matcher")
    needs_model, needs_matcher = any(m not in LEXICAL_MODES for m in modes), any(m in MATCHER_MODES for m in modes)
    tuned = load_bm25(model_dir) if uses_bm25(modes, r.shortlist_from) else None
    unused = [flag for flag, given, used in (("--model", r.model, needs_model or tuned is not None),
                                             ("--pooling", cfg.pooling, needs_model),
                                             ("--matcher", r.matcher, needs_matcher)) if given and not used]
    if unused:
        say(f"{', '.join(unused)} not used by mode {', '.join(modes)}")
    bm25_params = None
    if uses_bm25(modes, r.shortlist_from):
        bm25_params, bm25_note = model_bm25(model_dir)
        say(bm25_note)
    model = matcher = spec = None
    trainers = {} if tuned is None else {f"the BM25 parameters {Path(model_dir) / BM25_NAME}": tuned.trained_on}
    if needs_matcher:
        matcher = load_matcher_checked(r.matcher)
        trainers[f"matcher {r.matcher}"] = matcher.config.trained_on
    if needs_model:
        model = load_model_checked(model_dir)
        spec = resolve_spec(model, cfg.pooling, None,
                            [(matcher_spec(matcher), f"the matcher {r.matcher}")] if matcher else [])
        trainers[f"model {model_dir}"] = model.trained_on
    pairs, n_repeated = drop_repeated_queries(load_pairs(cfg.pairs, cfg.query_field, cfg.target_field))
    if n_repeated:
        say(f"{cfg.pairs}: dropped {n_repeated} pairs repeating an earlier query")
    fraction, which, cautions = held_out_split(cfg.pairs, trainers, cfg.test_fraction)
    for caution in cautions:
        warnings.warn(caution, stacklevel=2)
    say(f"scoring {which}")
    test = pairs if fraction is None else split_pairs(pairs, fraction)[1]
    if not test:
        raise MixretError(f"{cfg.pairs}: no pairs in the held-out split (test fraction {fraction}); expected at "
                          "least one")
    report = evaluate_pairs(test, model, matcher, modes, shortlist=r.shortlist, shortlist_from=r.shortlist_from,
                            limit=cfg.limit, batch_size=cfg.batch_size, pooling=spec.pooling if spec else "last",
                            max_length=spec.max_length if spec else None, fusion=fusion, bm25_params=bm25_params)
    report = {"pairs": str(cfg.pairs), "pairs_hash": file_hash(cfg.pairs), "scored": which,
              "test_fraction": fraction, "model": str(model_dir) if model is not None else None,
              "matcher": str(r.matcher) if matcher is not None else None,
              "embeddings": spec.to_dict() if spec else None, **report,
              "repeated_queries_dropped": n_repeated + report["repeated_queries_dropped"]}
    if cfg.out is not None:
        io.write_json(cfg.out, report)
    return report
