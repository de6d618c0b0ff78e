"""Corpora: (query, target) pairs for matchers and evaluation, plain texts for pretraining and embedding.

One reader for every format (.jsonl, .jsonl.gz, .parquet, .txt, Hugging Face dataset names), three views:
    load_pairs    (query, target) pairs for matchers and evaluation, split train/test by a stable hash of the id
    load_texts    every document of files, folders or datasets, as a `datasets.Dataset` with one column
                  "text" (pretraining)
    read_corpus   the texts of one field with their ids (embedding)
Every bad input raises MixretError naming the file and line.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import mmap
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mixret import io
from mixret.errors import MixretError, where
from mixret.io import atomic_path

BUNDLED_PAIRS_NAME = "debian-pairs.jsonl.gz"
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt")  # file kinds load_pairs, load_texts and read_corpus read
PAIR_FIELDS = ("summary", "document")  # fields of a TinyStoriesInstruct .txt file read as pairs
END_OF_TEXT = "<|endoftext|>"
TINYSTORIES_LABELS = ("Summary", "Story", "Features", "Words", "Random sentence")
_LABEL_LINE = re.compile(r"^(%s):[ \t]?(.*)$" % "|".join(re.escape(x) for x in TINYSTORIES_LABELS))
_CHUNK = 65536  # texts per Arrow chunk while building a Dataset


@dataclass(frozen=True)
class Pair:
    """One retrieval example: `query` should retrieve `target`."""
    id: str
    query: str
    target: str


def stable_id(text: str) -> str:
    """16 hex characters of blake2b(text): the same on every machine and Python run."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def _check_file(path: Path) -> str:
    """The file's format suffix, or a MixretError if it is missing or of an unsupported kind."""
    if not path.exists():
        raise MixretError(f"{path}: file not found")
    if not path.is_file():
        raise MixretError(f"{path}: not a file")
    suffix = _suffix(path)
    if suffix not in SUFFIXES:
        raise MixretError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                          f"expected one of {', '.join(SUFFIXES)}")
    if path.stat().st_size == 0:
        raise MixretError(f"{path}: empty file")
    return suffix


# --- reading records -------------------------------------------------------------------------

def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) for a text file, gzip-compressed if its name ends in .gz."""
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    yield line_no, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise MixretError(f"{where(path, line_no)}: not valid UTF-8 "
                                      f"({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        expected = "; expected a gzip-compressed file" if compressed else ""
        raise MixretError(f"{path}: cannot read ({e}){expected}") from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MixretError(f"{where(path, line_no)}: invalid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise MixretError(f"{where(path, line_no)}: expected a JSON object, got {type(rec).__name__}")
        yield line_no, rec


def _parquet_table(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for non-Parquet bytes
        raise MixretError(f"{path}: not a readable Parquet file ({e})") from None
    if columns is not None:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise MixretError(f"{path}: no column {missing[0]!r} (columns: {', '.join(schema.names)})")
    return pq.read_table(path, columns=list(columns) if columns is not None else None)


def _parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row as a dict) for a Parquet file."""
    for i, rec in enumerate(_parquet_table(path).to_pylist(), 1):
        yield i, rec


def _field(rec: dict, name: str, path: Path, line_no: int, role: str) -> str | None:
    """rec[name] as a string (None when null); a MixretError when absent or not text."""
    if name not in rec:
        raise MixretError(
            f"{where(path, line_no)}: record has no {role} field {name!r} "
            f"(fields: {', '.join(map(str, rec)) or 'none'})"
        )
    value = rec[name]
    if value is not None and not isinstance(value, str):
        raise MixretError(f"{where(path, line_no)}: field {name!r} should be text, got {type(value).__name__}")
    return value


# --- TinyStoriesInstruct ----------------------------------------------------------------------

def _tinystories_records(text: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(first line number, {label: value}) for each non-empty `<|endoftext|>`-separated record.

    A field starts at a line `Label: value` and runs until the next label line; a label that appears
    twice in a record keeps its first value.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    line_no = 1  # line on which the current record starts
    for record in text.split(END_OF_TEXT):
        lines = record.split("\n")
        start, line_no = line_no, line_no + len(lines) - 1
        if not record.strip():
            continue
        fields: dict[str, list[str]] = {}
        current: list[str] | None = None  # lines of the field being read; text before any label is ignored
        for line in lines:
            m = _LABEL_LINE.match(line)
            if m:
                current = [m.group(2)]
                fields.setdefault(m.group(1), current)
            elif current is not None:
                current.append(line)
        first = start + next(i for i, line in enumerate(lines) if line.strip())
        yield first, {k: "\n".join(v).strip() for k, v in fields.items()}


def parse_tinystories_instruct(text: str) -> tuple[list[Pair], int]:
    """Pairs (query = Summary, target = Story, id = stable_id(story)) from TinyStoriesInstruct text.

    Records are separated by `<|endoftext|>`; fields (Summary:, Story:, Features:, Words:,
    Random sentence:) may come in any order and span several lines. Returns (pairs, skipped), where
    skipped counts records without a summary or a story.
    """
    pairs, skipped = [], 0
    for _, fields in _tinystories_records(text):
        summary, story = fields.get("Summary", ""), fields.get("Story", "")
        if summary and story:
            pairs.append(Pair(stable_id(story), summary, story))
        else:
            skipped += 1
    return pairs, skipped


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        raise MixretError(f"{where(path, line_no)}: not valid UTF-8 ({e.reason})") from None


def _tinystories_pair_records(path: Path) -> Iterator[tuple[int, dict]]:
    for line_no, fields in _tinystories_records(_read_text(path)):
        yield line_no, {"query": fields.get("Summary", ""), "target": fields.get("Story", "")}


# --- pairs ------------------------------------------------------------------------------------

def load_pairs(
    path: str | os.PathLike,
    query_field: str = "summary",
    target_field: str = "document",
    id_field: str = "id",
) -> list[Pair]:
    """Read (query, target) pairs from .jsonl, .jsonl.gz, .parquet or TinyStoriesInstruct .txt.

    For .txt files the query is the Summary, the target the Story and the field arguments are unused.
    Ids come from `id_field`; repeated ids are an error naming both lines. Records without an id
    field (and every .txt record) get a stable hash of their text as id (query text for JSONL/Parquet,
    story text for .txt); a record repeating an earlier one's text is then skipped, with a warning.
    Records with empty query or target text are skipped, with a warning giving their count.
    Raises MixretError for a missing or empty file, malformed JSON or UTF-8, a missing field, or a
    file without usable pairs; messages give file:line (file:row for Parquet).
    """
    path = Path(path)
    suffix = _check_file(path)
    if suffix == ".txt":
        records, query_field, target_field, id_field = _tinystories_pair_records(path), "query", "target", None
        empty_what, hashed = "without a summary or a story", "story"
    else:
        records = _jsonl_records(path) if suffix in (".jsonl", ".jsonl.gz") else _parquet_records(path)
        empty_what, hashed = f"with empty {query_field!r} or {target_field!r} text", "query"
    pairs: list[Pair] = []
    first_line: dict[str, int] = {}
    n_records, n_empty, repeats = 0, 0, []
    for line_no, rec in records:
        n_records += 1
        query = _field(rec, query_field, path, line_no, "query")
        target = _field(rec, target_field, path, line_no, "target")
        if not (query and query.strip() and target and target.strip()):
            n_empty += 1
            continue
        given = id_field is not None and rec.get(id_field) is not None
        pair_id = str(rec[id_field]) if given else stable_id(target if hashed == "story" else query)
        if pair_id in first_line:
            if given:
                raise MixretError(
                    f"{where(path, line_no)}: duplicate id {pair_id!r} (first at {where(path, first_line[pair_id])}); "
                    f"expected each {id_field!r} to be unique"
                )
            repeats.append((line_no, first_line[pair_id]))
            continue
        first_line[pair_id] = line_no
        pairs.append(Pair(pair_id, query, target))
    if n_records == 0:
        raise MixretError(f"{path}: empty file (no records)")
    if n_empty:
        warnings.warn(f"{path}: skipped {n_empty} of {n_records} records {empty_what}", stacklevel=2)
    if repeats:
        line_no, first = repeats[0]
        warnings.warn(
            f"{path}: skipped {len(repeats)} records repeating an earlier record's {hashed} text "
            f"(first: {where(path, line_no)} repeats {where(path, first)})",
            stacklevel=2,
        )
    if not pairs:
        raise MixretError(f"{path}: no usable pairs (all {n_records} records have empty query or target text)")
    return pairs


def drop_repeated_queries(pairs: Iterable[Pair]) -> tuple[list[Pair], int]:
    """Keep the first pair of each query text -> (pairs, number dropped). A query with two relevant
    documents has no single right answer: train-matcher and evaluate both drop the later pairs, before
    splitting, so that they agree on the test split."""
    pairs = list(pairs)
    seen: set[str] = set()
    kept = [p for p in pairs if not (p.query in seen or seen.add(p.query))]
    return kept, len(pairs) - len(kept)


def _unit_hash(pair_id: str) -> float:
    """Stable number in [0, 1) from blake2b of the id."""
    return int.from_bytes(hashlib.blake2b(pair_id.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


def split_pairs(pairs: Iterable[Pair], test_fraction: float = 0.1) -> tuple[list[Pair], list[Pair]]:
    """(train, test): a pair is in test when the blake2b hash of its id falls below test_fraction.

    The side of each pair depends only on its id (not on order, other pairs or PYTHONHASHSEED);
    each side keeps input order.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise MixretError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    train, test = [], []
    for p in pairs:
        (test if _unit_hash(p.id) < test_fraction else train).append(p)
    return train, test


@dataclass
class PairSplit:
    train: list[Pair]
    test: list[Pair]
    repeated: int      # pairs dropped because they repeat an earlier query


def load_split(path: str | os.PathLike, query_field: str = "summary", target_field: str = "document",
               test_fraction: float = 0.1) -> PairSplit:
    """A pairs file as every command that splits one reads it: its pairs, those repeating an earlier query
    dropped (drop_repeated_queries), then split by a hash of the id (split_pairs)."""
    pairs, repeated = drop_repeated_queries(load_pairs(path, query_field, target_field))
    train, test = split_pairs(pairs, test_fraction)
    return PairSplit(train, test, repeated)


def write_pairs_jsonl(
    pairs: Iterable[Pair],
    path: str | os.PathLike,
    query_field: str = "summary",
    target_field: str = "document",
    id_field: str = "id",
) -> None:
    """Write pairs as JSONL (gzip-compressed if path ends in .gz), atomically; load_pairs reads it back."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        f = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if path.name.endswith(".gz") else raw
        for p in pairs:
            rec = {id_field: p.id, query_field: p.query, target_field: p.target}
            f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        if f is not raw:
            f.close()


def bundled_pairs_path() -> Path:
    """The Debian (summary, document) corpus shipped in the repository's data/ folder."""
    path = Path(__file__).resolve().parent.parent / "data" / BUNDLED_PAIRS_NAME
    if not path.is_file():
        raise MixretError(
            f"{path}: bundled corpus not found; it ships with the source repository, not the wheel. "
            "Install from a clone with `pip install -e .`, or pass a pairs file explicitly"
        )
    return path


BUNDLED_TEST_FRACTION = 0.1  # the bundled corpus's test split, the default of every command that splits pairs


def bundled_splits(test_fraction: float = BUNDLED_TEST_FRACTION) -> tuple[list[Pair], list[Pair]]:
    """(train, test) pairs of the bundled corpus."""
    return split_pairs(load_pairs(bundled_pairs_path()), test_fraction)


def bundled_training_texts():
    """The texts a model pretrained on the bundled corpus may see: the summary and the document of each pair
    of its training split (split_pairs, as everywhere), as load_texts gives them. The test split stays unseen,
    so that evaluating on it measures text the model never read."""
    import datasets

    train, _ = bundled_splits()
    texts = [t for p in train for t in (p.query, p.target)]
    return datasets.Dataset(pa.table({"text": pa.array(texts, type=pa.large_string())}))


# --- provenance -------------------------------------------------------------------------------

def file_hash(path: str | os.PathLike) -> str:
    """The content hash recorded for a data file (the first 16 hex digits of its sha256)."""
    return io.file_hash(path)


def sources_record(sources: Sequence[str | os.PathLike], test_fraction: float | None = None) -> list[dict]:
    """What trained a model, as saved with it (`trained_on` in config.json): one entry per file, with its path,
    content hash and which pairs it gave: {"split": "train", "test_fraction": f} when only the training
    split of split_pairs(f) was used, {"split": "all"} when every record was. A folder gives one entry per file;
    a Hugging Face dataset name an entry without a hash."""
    record = []
    for source in sources:
        files = _expand(source)
        for f in files if files is not None else [None]:
            entry = {"source": str(Path(f).resolve()) if f is not None else str(source),
                     "hash": file_hash(f) if f is not None else None}
            entry.update({"split": "all"} if test_fraction is None else
                         {"split": "train", "test_fraction": test_fraction})
            record.append(entry)
    return record


# --- texts ------------------------------------------------------------------------------------

def _has_end_of_text(path: Path) -> bool:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(END_OF_TEXT.encode()) != -1


def _txt_texts(path: Path) -> Iterator[str]:
    """Documents of a .txt file: `<|endoftext|>`-separated if the file has that token, else one a line."""
    if not _has_end_of_text(path):
        for _, line in _lines(path):
            if line.strip():
                yield line.rstrip("\r\n")
        return
    buf: list[str] = []
    for _, line in _lines(path):
        *done, rest = line.split(END_OF_TEXT)
        for part in done:
            doc = "".join(buf + [part]).replace("\r\n", "\n").strip()
            buf = []
            if doc:
                yield doc
        buf.append(rest)
    doc = "".join(buf).replace("\r\n", "\n").strip()
    if doc:
        yield doc


def _record_texts(records: Iterable[tuple[int, dict]], fields: Sequence[str], path: Path,
                  counts: dict) -> Iterator[str]:
    """Each record's fields, in record-major order; empty or null texts are counted in counts["empty"]."""
    for line_no, rec in records:
        for name in fields:
            value = _field(rec, name, path, line_no, "text")
            if value and value.strip():
                yield value
            else:
                counts["empty"] += 1


def _column_texts(table: pa.Table, fields: Sequence[str], source: str, counts: dict) -> list[pa.Array]:
    """The named text columns in record-major order (row 0 of every column, row 1, ...), empties dropped."""
    _check_text_columns(table, fields, source)
    if table.num_rows == 0:
        return []
    columns = [table.column(f).cast(pa.large_string()) for f in fields]
    merged = pa.chunked_array(columns).combine_chunks()
    if len(fields) > 1:
        n = table.num_rows
        merged = merged.take(pa.array(np.arange(n * len(fields)).reshape(len(fields), n).T.ravel()))
    keep = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(merged)), 0), False)
    counts["empty"] += len(merged) - pc.sum(keep).as_py()
    return [merged.filter(keep)]


def _hub_table(name: str, columns: Sequence[str]) -> pa.Table:
    """The "train" split of a Hugging Face dataset as an Arrow table, with the named columns present."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # network, missing repo or a bad builder: report whatever went wrong
        raise MixretError(
            f"{name}: not a local file or folder, and loading it as a Hugging Face dataset failed "
            f"({type(e).__name__}: {e})"
        ) from None
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise MixretError(f"{name}: dataset has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
    return ds.with_format("arrow")[:]


def _check_text_columns(table: pa.Table, fields: Sequence[str], source) -> None:
    for name in fields:
        if name not in table.column_names:
            raise MixretError(f"{source}: no column {name!r} (columns: {', '.join(table.column_names)})")
        kind = table.schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise MixretError(f"{source}: column {name!r} should be text, got {kind}")


def _file_texts(path: Path, fields: Sequence[str], counts: dict) -> list[pa.Array]:
    suffix = _check_file(path)
    if suffix == ".txt":
        return list(_chunks(_txt_texts(path)))
    if suffix == ".parquet":
        return _column_texts(_parquet_table(path, fields), fields, str(path), counts)
    return list(_chunks(_record_texts(_jsonl_records(path), fields, path, counts)))


def _expand(source: str | os.PathLike) -> list[Path] | None:
    """Local files for a source (a folder gives its supported files, sorted), or None for a hub name."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and _suffix(p) in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise MixretError(f"{path}: folder has no {', '.join(SUFFIXES)} files")
        return files
    if path.exists() or _suffix(path) in SUFFIXES or str(source).startswith((".", "/", "~")):
        return [path]
    return None


def _chunks(texts: Iterable[str]) -> Iterator[pa.Array]:
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) == _CHUNK:
            yield pa.array(buf, type=pa.large_string())
            buf = []
    if buf:
        yield pa.array(buf, type=pa.large_string())


def load_texts(sources: str | os.PathLike | Sequence[str | os.PathLike], text_field: str | Sequence[str] = "text"):
    """A `datasets.Dataset` with one column "text" holding every document of the sources, in order.

    Each source is a local file (.txt, .jsonl, .jsonl.gz, .parquet), a folder (its supported files,
    sorted by path) or a Hugging Face dataset name (its "train" split). `text_field` names the JSONL
    field or column to read; a list of names gives each record's fields as separate documents, e.g.
    ["summary", "document"] for a pairs file. A .txt file holds one document a line, or documents
    separated by `<|endoftext|>` if the file contains that token (text_field does not apply). Empty texts are
    skipped with a warning giving their count; malformed files, missing fields and an empty corpus raise MixretError.
    """
    import datasets

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    fields = [text_field] if isinstance(text_field, str) else list(text_field)
    if not fields:
        raise MixretError("text_field must name at least one field")
    chunks: list[pa.Array] = []
    for source in sources:
        files = _expand(source)
        for origin in files if files is not None else [str(source)]:
            counts = {"empty": 0}
            got = _column_texts(_hub_table(origin, fields), fields, origin, counts) if files is None \
                else _file_texts(origin, fields, counts)
            if not sum(len(c) for c in got):
                raise MixretError(f"{origin}: no texts found ({counts['empty']} empty); expected a non-empty corpus")
            if counts["empty"]:
                warnings.warn(f"{origin}: skipped {counts['empty']} empty texts", stacklevel=2)
            chunks.extend(got)
    if not chunks:
        raise MixretError("no sources given: expected at least one file, folder or dataset name")
    return datasets.Dataset(pa.table({"text": pa.chunked_array(chunks, type=pa.large_string())}))


# --- a corpus to embed ------------------------------------------------------------------------

@dataclass
class Corpus:
    """Texts to embed with their ids; `skipped` counts records left out because their text was empty."""
    ids: list[str]
    texts: list[str]
    skipped: int


def read_corpus(corpus: str | os.PathLike, field: str = "text", id_field: str = "id") -> Corpus:
    """Texts of `field` with ids from `id_field` (or the record's line / row number when it has none).

    corpus is a .jsonl, .jsonl.gz or .parquet file, a Hugging Face dataset name ("train" split), or a
    .txt file: with field "text" its documents (one a line, or `<|endoftext|>`-separated; ids are
    document numbers), with field "summary" or "document" the Summary or Story of each
    TinyStoriesInstruct record (ids as load_pairs gives them). Empty texts are skipped and
    counted; malformed files, missing fields, repeated ids and a corpus without text raise MixretError.
    """
    path = Path(corpus).expanduser()
    if path.is_dir():
        raise MixretError(f"{path}: is a folder; expected a {', '.join(SUFFIXES)} file or a dataset name")
    if _expand(corpus) is None:
        rows, source = _table_rows(_hub_table(str(corpus), [field]), field, id_field, str(corpus)), str(corpus)
    else:
        suffix, source = _check_file(path), path
        if suffix == ".txt":
            rows = _txt_rows(path, field)
        elif suffix == ".parquet":
            rows = _table_rows(_parquet_table(path), field, id_field, path)
        else:
            rows = ((n, _field(rec, field, path, n, "text"), rec.get(id_field)) for n, rec in _jsonl_records(path))
    ids, texts, skipped, first = [], [], 0, {}
    for n, text, rec_id in rows:
        if not (text and text.strip()):
            skipped += 1
            continue
        rec_id = str(n) if rec_id is None else str(rec_id)
        if rec_id in first:
            raise MixretError(f"{where(source, n)}: id {rec_id!r} repeats the id at {where(source, first[rec_id])}; "
                              f"expected unique values in field {id_field!r}")
        first[rec_id] = n
        ids.append(rec_id)
        texts.append(text)
    if not texts:
        raise MixretError(f"{source}: no texts to embed in field {field!r} ({skipped} empty); "
                          "expected at least one non-empty text")
    return Corpus(ids, texts, skipped)


def _txt_rows(path: Path, field: str):
    """(document number from 1, text, id or None) of a .txt file."""
    if field == "text":
        return ((n, t, None) for n, t in enumerate(_txt_texts(path), 1))
    if field in PAIR_FIELDS:
        return ((n, p.query if field == "summary" else p.target, p.id) for n, p in enumerate(load_pairs(path), 1))
    raise MixretError(f"{path}: a .txt file has no field {field!r}; expected 'text' (its documents) or "
                      f"{' or '.join(repr(f) for f in PAIR_FIELDS)} (TinyStoriesInstruct summaries or stories)")


def _table_rows(table: pa.Table, field: str, id_field: str, source):
    """(row number from 1, text, id or None) for an Arrow table."""
    _check_text_columns(table, [field], source)
    texts = table.column(field).to_pylist()
    ids = table.column(id_field).to_pylist() if id_field in table.column_names else [None] * len(texts)
    return zip(range(1, len(texts) + 1), texts, ids)
