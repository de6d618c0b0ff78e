"""Build the bundled Debian (summary, document) pair corpus from a Debian descriptions JSONL dump.

    python scripts/prepare_data.py SOURCE.jsonl.gz --out data/ [--n 8000] [--extra-train]

SOURCE holds one JSON object a line with fields id (binary package), source (source package), summary
(the `Description` synopsis line) and document (the extended description). The script drops pairs that
make retrieval ill-posed (documents shorter than --min-chars, repeated documents, repeated summaries;
repeats are compared case- and whitespace-insensitively), then keeps the --n pairs whose ids have the
smallest (personalised) blake2b hash: a fair, order-independent sample. With --extra-train it then appends
every other usable pair that mixret.data.split_pairs puts on the training side at the bundled test fraction:
more training pairs, while the test split stays exactly the sample's. Texts are written exactly as found.
The output (data/debian-pairs.jsonl.gz) is byte-for-byte reproducible.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

OUT_NAME = "debian-pairs.jsonl.gz"
FIELDS = ("id", "source", "summary", "document")


def id_rank(pair_id: str) -> int:
    """Stable pseudo-random rank of an id (independent of file order and Python's hash seed).

    The hash is personalised so that it is unrelated to the unsalted hash mixret.data.split_pairs
    uses: the sample must not favour either side of the train/test split.
    """
    digest = hashlib.blake2b(pair_id.encode("utf-8"), digest_size=8, person=b"mixret-sample").digest()
    return int.from_bytes(digest, "big")


def repeat_key(text: str) -> str:
    """Comparison key for spotting repeats; the text itself is never changed."""
    return " ".join(text.lower().split())


def read_records(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [k for k in FIELDS if not isinstance(rec.get(k), str)]
            if missing:
                sys.exit(f"{path}:{line_no}: missing or non-string fields {missing}")
            records.append({k: rec[k] for k in FIELDS})
    return records


def select(records: list[dict], n: int, min_chars: int) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(the n pairs with the smallest id rank among those that are well-posed, in rank order; the other
    well-posed pairs, in rank order; how many were dropped and why)."""
    dropped = {"short": 0, "repeated document": 0, "repeated summary": 0}
    seen_docs: set[str] = set()
    seen_summaries: set[str] = set()
    chosen, rest = [], []
    for rec in sorted(records, key=lambda r: (id_rank(r["id"]), r["id"])):
        doc_key, sum_key = repeat_key(rec["document"]), repeat_key(rec["summary"])
        if len(rec["document"].strip()) < min_chars or not rec["summary"].strip():
            dropped["short"] += 1
        elif doc_key in seen_docs:
            dropped["repeated document"] += 1
        elif sum_key in seen_summaries:
            dropped["repeated summary"] += 1
        else:
            seen_docs.add(doc_key)
            seen_summaries.add(sum_key)
            (chosen if len(chosen) < n else rest).append(rec)
    ids = [r["id"] for r in chosen + rest]
    assert len(set(ids)) == len(ids), "source ids are not unique"
    return chosen, rest, dropped


def training_side(records: list[dict]) -> list[dict]:
    """The records that the bundled split (split_pairs at BUNDLED_TEST_FRACTION) puts in training."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mixret.data import BUNDLED_TEST_FRACTION, Pair, split_pairs
    train, _ = split_pairs([Pair(r["id"], r["summary"], r["document"]) for r in records], BUNDLED_TEST_FRACTION)
    keep = {p.id for p in train}
    return [r for r in records if r["id"] in keep]


def write_jsonl_gz(records: list[dict], path: Path) -> None:
    """Deterministic gzip (no timestamp, no file name), written atomically."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for rec in records:
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="Debian descriptions JSONL (.jsonl or .jsonl.gz)")
    ap.add_argument("--out", type=Path, default=Path("data"), help="output folder")
    ap.add_argument("--n", type=int, default=8000, help="number of pairs to keep")
    ap.add_argument("--min-chars", type=int, default=40, help="drop documents shorter than this")
    ap.add_argument("--extra-train", action="store_true",
                    help="append every other usable pair that falls on the training side of the bundled split")
    args = ap.parse_args(argv)

    records = read_records(args.source)
    chosen, rest, dropped = select(records, args.n, args.min_chars)
    if len(chosen) < args.n:
        print(f"warning: only {len(chosen)} usable pairs (asked for {args.n})", file=sys.stderr)
    extra = training_side(rest) if args.extra_train else []
    out = args.out / OUT_NAME
    write_jsonl_gz(chosen + extra, out)
    print(f"read {len(records)} pairs; dropped over the whole source: {dropped}")
    print(f"wrote {len(chosen)} sampled pairs" + (f" and {len(extra)} extra training pairs" if extra else "")
          + f" to {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
