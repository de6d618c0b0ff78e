"""Does the matcher add anything on a fine-tuned model? hybrid and tree against the shortlist's own order and
fusion, for matchers with and without score features (BM25, cosine), on the held-out split of the pairs.

    PYTHONPATH=. python scripts/bench_matcher_features.py --model runs/mm-ft --out docs/bench/matcher_features.md

The pairs are split as `mixret train-matcher` and `mixret evaluate` split them (repeated queries dropped, a
tenth held out by a hash of the id). Both sides of every pair are embedded once with the model; each matcher
variant is trained on the training split with `train_matcher`, then every query of the held-out split is
searched among all its documents (`evaluate_pairs`): vector, fusion (the model's fusion.json), bm25, and
per matcher tree and hybrid with the shortlist from vector and from bm25, each beside its shortlist's order.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mixret.data import bundled_pairs_path, drop_repeated_queries, load_pairs, split_pairs
from mixret.models import load
from mixret.models.matcher import MatcherConfig
from mixret.retrieval.evaluate import evaluate_pairs
from mixret.retrieval.fusion import FUSION_NAME, Fusion
from mixret.training.matcher import dedupe_queries, train_matcher

VARIANTS = {  # name: (features, hard negatives of the 30 negatives per set)
    "plain": ([], 0),
    "plain-hard": ([], 15),
    "features": (["bm25", "cosine"], 0),
    "features-hard": (["bm25", "cosine"], 15),
}


class CachedEncoder:
    """model.encode with every text embedded once."""

    def __init__(self, model):
        self.model, self.cache = model, {}

    def encode(self, texts, batch_size=64, pooling="last", **kw):
        new = sorted({t for t in texts if t not in self.cache})
        if new:
            emb = self.model.encode(new, batch_size=batch_size, pooling=pooling, **kw)
            self.cache.update(zip(new, emb))
        return np.stack([self.cache[t] for t in texts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="A fine-tuned model folder (with fusion.json).")
    ap.add_argument("--pairs", default=None, help="Pairs file (default: the bundled pairs).")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="Matcher variants, comma-separated.")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--shortlist", type=int, default=256)
    ap.add_argument("--tree-queries", type=int, default=None, help="Queries evaluated in tree mode (default all).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="Markdown table to write (and .json beside it).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pairs, _ = drop_repeated_queries(load_pairs(args.pairs or bundled_pairs_path()))
    train, test = split_pairs(pairs, 0.1)
    model = load(args.model)
    pooling = getattr(model.config, "pooling", "last")
    enc = CachedEncoder(model)
    t0 = time.perf_counter()
    q = enc.encode([p.query for p in train + test], pooling=pooling)
    t = enc.encode([p.target for p in train + test], pooling=pooling)
    print(f"embedded {len(enc.cache)} texts in {time.perf_counter() - t0:.0f} s", flush=True)
    splits = {}
    for name, part, rows in (("train", train, slice(0, len(train))), ("test", test, slice(len(train), None))):
        sq, st, keep = dedupe_queries(q[rows], t[rows])
        splits[name] = (sq, st, ([part[i].query for i in keep], [part[i].target for i in keep]))
    fusion_file = Path(args.model) / FUSION_NAME
    fusion = Fusion.from_dict(json.loads(fusion_file.read_text())) if fusion_file.is_file() else None

    rows, record = [], {"model": args.model, "n_train": len(train), "n_test": len(test), "epochs": args.epochs,
                        "shortlist": args.shortlist, "variants": {}}
    base = evaluate_pairs(test, enc, None, "all", pooling=pooling, fusion=fusion)
    for mode, m in base["modes"].items():
        rows.append(("-", mode, m))
    record["baseline"] = base
    for name in args.variants.split(","):
        features, hard = VARIANTS[name]
        (trq, trt, trx), (teq, tet, tex) = splits["train"], splits["test"]
        config = MatcherConfig(emb_dim=int(q.shape[1]), features=features)
        t0 = time.perf_counter()
        matcher, metrics = train_matcher(trq, trt, teq, tet, config, epochs=args.epochs, hard_negatives=hard,
                                         seed=0, progress=False, train_texts=trx, test_texts=tex)
        seconds = time.perf_counter() - t0
        print(f"{name}: trained in {seconds:.0f} s; in-set test top-1 {metrics['test']['top1']:.3f}", flush=True)
        entry = {"train_seconds": seconds, "in_set_test": metrics["test"], "steps": metrics["steps"]}
        for source in ("vector", "bm25"):
            rep = evaluate_pairs(test, enc, matcher, ["hybrid"], shortlist=args.shortlist, shortlist_from=source,
                                 pooling=pooling)
            rows.append((name, f"hybrid from {source} ({args.shortlist})", rep["modes"]["hybrid"]))
            entry[f"hybrid_{source}"] = rep["modes"]["hybrid"]
        rep = evaluate_pairs(test, enc, matcher, ["tree"], limit=args.tree_queries, pooling=pooling)
        rows.append((name, "tree" + (f" (first {args.tree_queries})" if args.tree_queries else ""),
                     rep["modes"]["tree"]))
        entry["tree"] = rep["modes"]["tree"]
        record["variants"][name] = entry
        print(table(rows), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=1))


def table(rows) -> str:
    lines = ["| matcher | mode | R@1 | R@10 | MRR@10 | nDCG@10 |", "|---|---|---:|---:|---:|---:|"]
    for name, mode, m in rows:
        lines.append(f"| {name} | {mode} | " + " | ".join(f"{m[c]:.3f}" for c in ("R@1", "R@10", "MRR@10", "nDCG@10"))
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
