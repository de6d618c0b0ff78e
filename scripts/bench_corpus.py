"""BM25 after a write, three ways: recomputed from the texts, from kept term ids, or from kept term statistics.

    python scripts/bench_corpus.py [--sizes 10000,100000] [--batch 10] [--repeats 3] [--out docs/bench/] [--quick]

bm25s cannot add a document to an index: document frequencies, IDF and the mean length change with every write,
so every (text, term) score does. What can be kept is the tokenisation. For each corpus size N (synthetic texts:
20 to 200 words drawn from a Zipf-distributed vocabulary of 50,000 words), after a write of --batch new texts:

- recompute: `BM25Index(texts)`: every text tokenised (stopwords, Snowball stems) and scored again by bm25s;
- term ids: each text's term ids kept, only the new texts tokenised, then bm25s's own index built from the ids
  (its scoring loop runs text by text, in Python);
- term statistics: each text's distinct term ids, their counts and its length kept, only the new texts tokenised,
  then IDF and every score computed at once with numpy (`BM25Index.updated`, what `mixret serve` does).

Each is timed best of --repeats; the table also gives the first build with and without the kept statistics and
the largest difference between the scores of recompute and of each other way over 20 queries (0: the same
index). Writes OUT/corpus.md and OUT/corpus.json.
"""
import argparse
import time
from pathlib import Path

import bench_common as bc
import numpy as np

from mixret.retrieval.bm25 import BM25Index

VOCAB = 50_000


def synthetic_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}x" for i in range(VOCAB)])
    ranks = np.minimum(rng.zipf(1.2, size=n * 200) - 1, VOCAB - 1)
    lengths = rng.integers(20, 201, size=n)
    out, at = [], 0
    for length in lengths:
        out.append(" ".join(words[ranks[at:at + length]]))
        at += length
    return out


def best(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def measure(n: int, batch: int, repeats: int) -> dict:
    texts = synthetic_texts(n, seed=n)
    new = synthetic_texts(batch, seed=n + 1)
    after = texts + new
    keep, added = np.arange(n), np.arange(n, n + batch)
    build_plain, _ = best(lambda: BM25Index(texts), 1)
    build_kept, kept = best(lambda: BM25Index(texts, keep_terms=True), 1)
    recompute_s, full = best(lambda: BM25Index(after), repeats)
    ids_s, by_ids = best(term_ids_way(kept, texts, new), repeats)
    update_s, updated = best(lambda: kept.updated(keep, after, added), repeats)
    queries = [" ".join(t.split()[:3]) for t in after[::max(1, len(after) // 20)][:20]]
    diff = max(float(np.abs(full.scores(q) - updated.scores(q)).max()) for q in queries)
    diff_ids = max(float(np.abs(full.scores(q) - by_ids(q)).max()) for q in queries)
    return {"docs": n, "batch": batch, "build_s": build_plain, "build_keep_terms_s": build_kept,
            "recompute_s": recompute_s, "term_ids_s": ids_s, "keep_terms_s": update_s,
            "speedup": recompute_s / update_s, "max_score_diff": diff, "max_score_diff_term_ids": diff_ids}


def term_ids_way(index: BM25Index, texts: list[str], new: list[str]):
    """The term-ids way: every text's term ids kept (here: made once, outside the timing), the new texts
    tokenised, bm25s's index built from the ids -> a function query -> scores [N + batch]."""
    import bm25s
    vocab = dict(index.vocab)
    ids = [[vocab.setdefault(t, len(vocab)) for t in words] for words in index.tokenize(texts)]

    def write():
        doc_ids = ids + [[vocab.setdefault(t, len(vocab)) for t in words] for words in index.tokenize(new)]
        retriever = bm25s.BM25(k1=index.k1, b=index.b)
        retriever.index((doc_ids, dict(vocab)), show_progress=False)

        def scores(query: str) -> np.ndarray:
            known = [t for t in index.tokenize([query])[0] if t in retriever.vocab_dict]
            return retriever.get_scores(known) if known else np.zeros(len(doc_ids), np.float32)
        return scores
    return write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bc.add_common_args(parser, "corpus")
    parser.add_argument("--sizes", default="10000,100000", help="corpus sizes, comma-separated")
    parser.add_argument("--batch", type=int, default=10, help="texts added by the write")
    args = parser.parse_args()
    device = bc.setup(args)
    sizes = [1000, 3000] if args.quick else [int(s) for s in args.sizes.split(",")]
    info = bc.machine_info(device)
    rows = []
    for n in sizes:
        rows.append(measure(n, args.batch, 1 if args.quick else args.repeats))
        print(rows[-1], flush=True)
    info = bc.finish_info(info)
    table = bc.markdown_table(rows, [("docs", "texts"), ("batch", "written"), ("recompute_s", "recompute (s)"),
                                     ("term_ids_s", "term ids (s)"), ("keep_terms_s", "term statistics (s)"),
                                     ("speedup", "speed-up over recompute"), ("build_s", "first build (s)"),
                                     ("build_keep_terms_s", "first build, keeping statistics (s)"),
                                     ("max_score_diff_term_ids", "max score diff, term ids"),
                                     ("max_score_diff", "max score diff, term statistics")])
    intro = (f"BM25 after a write of {args.batch} texts to a corpus of N synthetic texts: recomputed from the texts, "
             f"built by bm25s from the term ids kept since the first build, or computed at once from the term "
             f"statistics kept (`BM25Index.updated`, what `mixret serve` does). Best of "
             f"{1 if args.quick else args.repeats}; 1 thread.")
    text = bc.write_report(Path(args.out), "corpus", "BM25 after a write", info, intro, [("Times", table)],
                           {"rows": rows, "batch": args.batch, "vocab": VOCAB})
    print(text)


if __name__ == "__main__":
    main()
