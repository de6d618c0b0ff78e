"""A corpus that changes: an EMB_DIR updated by id, in versions, and the write-ahead log of `mixret serve`.

Versions. meta.json names the EMB_DIR's version v (none: 0). Version 0's files have the names `mixret embed` and
`mixret index` write (embeddings.safetensors, ids.jsonl, index.faiss, index.json); version v > 0 puts v in each
name (embeddings.3.safetensors, ids.3.jsonl, index.3.faiss, index.3.json, and index.3.rows.safetensors for an
updated approximate index). An update writes every file of version v + 1 under its new name and flushes it to
the disk, then replaces meta.json (written beside it, flushed, renamed: the one step that commits), then removes
the files of versions before v (version v stays, for a reader that read the old meta.json a moment before). A
crash at any point therefore leaves meta.json naming either the old version, whose files are untouched, or the
new one, whose files were on the disk before it was named; files of an update that never committed are removed
by the next one. One writer at a time: an update holds the EMB_DIR's write.lock (an advisory lock, released by
the system when its process ends, however it ends).

Rows. An update keeps the order of the corpus: a deleted text leaves its row, a text whose id exists replaces it
in its row, and new texts follow the last row, in the order of their file.

The write-ahead log (writes.wal, of `mixret serve`). One line a write: `SUM JSON` where JSON is {"seq", "put":
[{"id", "text"}], "delete": [ids], "dim", "emb": the put texts' embeddings, float32, base64} and SUM the first 16
hex digits of its sha256. A write is acknowledged only after its line is flushed to the disk. A last line that is
cut short or does not match its SUM is a write that was never acknowledged: it is dropped. meta.json's
wal_applied is the last seq the folder's files already hold; loading the folder (search, serve, index) applies
the later lines in order, with their recorded embeddings (no model needed), and `serve` folds them into a new
version at start, after which the log is emptied.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

import mixret.retrieval.milvus  # noqa: F401  (the milvus backend of VectorIndex.load)
from mixret import io
from mixret.data import read_corpus
from mixret.errors import MixretError, where
from mixret.io import versioned
from mixret.models.encode import DTYPES, EmbeddingSpec, check_texts, encode_texts, pick_device, truncation_message
from mixret.retrieval.embeddings import EMB_NAME, IDS_NAME, META_NAME, load_emb_dir, load_model_checked
from mixret.retrieval.index import INDEX_META_NAME, INDEX_NAME, VectorIndex

WAL_NAME = "writes.wal"
LOCK_NAME = "write.lock"
_VERSIONED = re.compile(r"^(embeddings|ids|index)\.(\d+)\.")


# -- a corpus state and a change to it --------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """An EMB_DIR's corpus in memory: ids, texts, embeddings [N, D] float32 (rounded to the folder's dtype),
    meta.json, its vector index (None when it has none), and the last write-ahead-log seq it holds."""
    ids: list[str]
    texts: list[str]
    emb: np.ndarray
    meta: dict
    index: VectorIndex | None
    seq: int = 0

    @property
    def version(self) -> int:
        return self.meta.get("version", 0)

    def rows(self) -> dict[str, int]:
        return {doc_id: row for row, doc_id in enumerate(self.ids)}


@dataclass(frozen=True)
class Change:
    """One write: ids to delete, then texts to add or replace (put_emb [n, D]: their embeddings)."""
    delete: list[str] = field(default_factory=list)
    put_ids: list[str] = field(default_factory=list)
    put_texts: list[str] = field(default_factory=list)
    put_emb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.delete) + len(self.put_ids)


@dataclass(frozen=True)
class Applied:
    """A change applied: the new snapshot; keep [N_old] the new row of each old row (-1: deleted, or replaced);
    added [n] the rows whose texts are new; how many texts were added, replaced and deleted."""
    snapshot: Snapshot
    keep: np.ndarray
    added: np.ndarray
    counts: dict


def apply_change(snap: Snapshot, change: Change, seq: int | None = None, source: str = "the update") -> Applied:
    """The snapshot after `change` (deletes first, then puts); snap is left as it was. An unknown id to delete,
    an id repeated within the change, or a corpus left empty is a MixretError naming `source`."""
    rows = snap.rows()
    put_emb = _checked(change, rows, snap.emb.shape[1], source)
    deleted = {rows[i] for i in change.delete}
    keep = np.full(len(snap.ids), -1, dtype=np.int64)
    survivors = [r for r in range(len(snap.ids)) if r not in deleted]
    keep[survivors] = np.arange(len(survivors))
    ids = [snap.ids[r] for r in survivors]
    texts = [snap.texts[r] for r in survivors]
    emb_rows = [snap.emb[survivors]]
    new_rows = {doc_id: row for row, doc_id in enumerate(ids)}
    added, replaced, appended = [], 0, []
    for j, (doc_id, text) in enumerate(zip(change.put_ids, change.put_texts)):
        row = new_rows.get(doc_id)
        if row is None:
            row = len(ids) + len(appended)
            appended.append(j)
        else:
            replaced += 1
            texts[row] = text
            keep[survivors[row]] = -1
        added.append(row)
    emb = np.concatenate(emb_rows + [put_emb[appended]]) if appended else emb_rows[0]
    new_texts = set(appended)
    for j, row in enumerate(added):
        if j not in new_texts:
            emb[row] = put_emb[j]
    ids += [change.put_ids[j] for j in appended]
    texts += [change.put_texts[j] for j in appended]
    if not ids:
        raise MixretError(f"{source}: it would leave the corpus empty; expected at least one text to remain")
    added = np.asarray(added, dtype=np.int64)
    index = None if snap.index is None else snap.index.updated(emb, keep, added)
    meta = {**snap.meta, "count": len(ids)}
    new = Snapshot(ids, texts, emb, meta, index, snap.seq if seq is None else seq)
    counts = {"added": len(appended), "replaced": replaced, "deleted": len(deleted)}
    return Applied(new, keep, added, counts)


def _checked(change: Change, rows: dict[str, int], dim: int, source: str) -> np.ndarray:
    """The change's embeddings [n, dim] float32, once its ids, texts and embeddings agree with each other and with
    the corpus (rows: id -> row); a MixretError naming `source` otherwise."""
    _check_unique(change.delete, "deletes", source)
    _check_unique(change.put_ids, "texts", source)
    unknown = [i for i in change.delete if i not in rows]
    if unknown:
        raise MixretError(f"{source}: cannot delete {_some(unknown)}: no such id in the corpus")
    if len(change.put_texts) != len(change.put_ids):
        raise MixretError(f"{source}: {len(change.put_texts)} texts for {len(change.put_ids)} ids; expected one each")
    put_emb = np.zeros((0, dim), np.float32) if change.put_emb is None else np.asarray(change.put_emb, np.float32)
    if put_emb.shape != (len(change.put_ids), dim):
        raise MixretError(f"{source}: {put_emb.shape} embeddings for {len(change.put_ids)} texts; expected "
                          f"({len(change.put_ids)}, {dim})")
    return put_emb


def _check_unique(ids: Sequence[str], what: str, source: str) -> None:
    seen, repeated = set(), []
    for i in ids:
        if i in seen:
            repeated.append(i)
        seen.add(i)
    if repeated:
        raise MixretError(f"{source}: the {what} repeat the id(s) {_some(repeated)}; expected each id once")


def _some(ids: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


# -- reading and writing versions -------------------------------------------------------------

def load_snapshot(emb_dir: str | os.PathLike, with_index: bool = True, loaded=None) -> tuple[Snapshot, int]:
    """The EMB_DIR as it is, with the writes of its log that its files do not hold yet applied
    -> (snapshot, how many log lines were applied). with_index: load its vector index (an error when it has
    none; refused when it was made from other embeddings); loaded: what load_emb_dir already read of it."""
    emb, ids, texts, meta = loaded if loaded is not None else load_emb_dir(emb_dir)
    index = None
    if with_index:
        index = VectorIndex.load(emb_dir, expected_dim=emb.shape[1], expected_spec=EmbeddingSpec.of(meta),
                                 expected_count=len(ids), version=meta.get("version", 0))
    snap = Snapshot(ids, texts, emb, meta, index, int(meta.get("wal_applied", 0)))
    applied = 0
    for seq, change, line in read_wal(Path(emb_dir) / WAL_NAME, emb.shape[1]):
        if seq <= snap.seq:
            continue
        snap = apply_change(snap, change, seq, where(Path(emb_dir) / WAL_NAME, line)).snapshot
        applied += 1
    return snap, applied


def has_index(emb_dir: str | os.PathLike, meta: dict) -> bool:
    return (Path(emb_dir) / versioned(INDEX_META_NAME, meta.get("version", 0))).is_file()


def write_version(emb_dir: str | os.PathLike, snap: Snapshot, update: dict | None = None) -> Snapshot:
    """Write snap as the EMB_DIR's next version and commit it (see the module docstring) -> the snapshot as
    written (its meta.json). The caller holds the write lock."""
    import torch
    from safetensors.torch import save_file

    directory = Path(emb_dir)
    version = snap.version + 1
    _remove_uncommitted(directory, snap.version)
    dtype = snap.meta.get("dtype", "float32")
    with io.atomic_path(directory / versioned(EMB_NAME, version)) as tmp:
        save_file({"embeddings": torch.from_numpy(np.ascontiguousarray(snap.emb)).to(DTYPES[dtype])}, tmp)
        io.fsync_file(tmp)
    with io.atomic_path(directory / versioned(IDS_NAME, version)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc_id, text in zip(snap.ids, snap.texts):
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    if snap.index is not None:
        for name in snap.index.save(directory, version):
            io.fsync_file(directory / name)
    io.fsync_dir(directory)
    meta = {**snap.meta, "version": version, "count": len(snap.ids), "wal_applied": snap.seq}
    if update is not None:
        meta["last_update"] = update
    with io.atomic_path(directory / META_NAME) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    io.fsync_dir(directory)                       # committed: meta.json names the new version
    _remove_versions(directory, keep=(version, version - 1))
    return replace(snap, meta=meta)


def _remove_uncommitted(directory: Path, current: int) -> None:
    """Files of versions after `current` (an update that crashed before its commit) and temporary files."""
    for path in directory.iterdir():
        m = _VERSIONED.match(path.name)
        if (m and int(m.group(2)) > current) or (path.name.startswith(".") and path.name.endswith(".tmp")):
            path.unlink(missing_ok=True)


def _remove_versions(directory: Path, keep: tuple[int, ...]) -> None:
    base = (EMB_NAME, IDS_NAME, INDEX_NAME, INDEX_META_NAME, "index.rows.safetensors")
    for path in directory.iterdir():
        m = _VERSIONED.match(path.name)
        version = int(m.group(2)) if m else (0 if path.name in base else None)
        if version is not None and version not in keep and path.is_file():
            path.unlink(missing_ok=True)


class WriteLock:
    """The EMB_DIR's write.lock, held exclusively (one updating process at a time); released on exit."""

    def __init__(self, emb_dir: str | os.PathLike):
        self.path = Path(emb_dir) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "WriteLock":
        if not self.path.parent.is_dir():
            raise MixretError(f"{self.path.parent}: embeddings folder not found")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise MixretError(f"{self.path.parent}: another process is writing this EMB_DIR (it holds {self.path}; "
                              f"a `mixret serve` with writes on, or another `mixret index`); expected one writer "
                              f"at a time: stop it, or send the writes to the server") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# -- the write-ahead log ----------------------------------------------------------------------

def _checksum(payload: str) -> str:
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def wal_line(seq: int, change: Change) -> str:
    emb = np.ascontiguousarray(np.zeros((0, 0), np.float32) if change.put_emb is None else change.put_emb,
                               dtype=np.float32)
    record = {"seq": seq, "delete": list(change.delete),
              "put": [{"id": i, "text": t} for i, t in zip(change.put_ids, change.put_texts)],
              "dim": int(emb.shape[1]) if emb.ndim == 2 else 0, "emb": base64.b64encode(emb.tobytes()).decode()}
    payload = json.dumps(record, ensure_ascii=False, sort_keys=True)
    return f"{_checksum(payload)} {payload}\n"


def _parse_line(raw: bytes, dim: int) -> tuple[int, Change] | None:
    """A log line -> (seq, change), or None when it is cut short or does not match its checksum."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\n") or " " not in text:
        return None
    checksum, payload = text[:-1].split(" ", 1)
    if _checksum(payload) != checksum:
        return None
    record = json.loads(payload)
    emb = np.frombuffer(base64.b64decode(record["emb"]), dtype=np.float32)
    puts = record["put"]
    emb = emb.reshape(len(puts), dim) if puts else np.zeros((0, dim), np.float32)
    return record["seq"], Change(list(record["delete"]), [p["id"] for p in puts], [p["text"] for p in puts], emb)


def read_wal(path: Path, dim: int) -> list[tuple[int, Change, int]]:
    """The log's writes -> [(seq, change, line number)]; a bad last line (a write cut short by a crash, never
    acknowledged) is dropped, a bad line before the last is a MixretError."""
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines(keepends=True)
    out = []
    for n, raw in enumerate(lines, 1):
        try:
            parsed = _parse_line(raw, dim)
        except (ValueError, KeyError, TypeError) as e:
            raise MixretError(f"{where(path, n)}: a log line that matches its checksum but is not a write "
                              f"({type(e).__name__}: {e}); expected {{seq, put, delete, dim, emb}}") from None
        if parsed is None:
            if n == len(lines):
                break
            raise MixretError(f"{where(path, n)}: damaged line in the write-ahead log (before its last line, so not "
                              f"a write cut short by a crash); expected `CHECKSUM JSON`. Move the file away to load "
                              f"the folder without the writes it holds")
        seq, change = parsed
        if out and seq <= out[-1][0]:
            raise MixretError(f"{where(path, n)}: seq {seq} after seq {out[-1][0]}; expected increasing numbers")
        out.append((seq, change, n))
    return out


class WriteLog:
    """The log of an EMB_DIR, opened for appending (a cut-short last line is cut off first)."""

    def __init__(self, emb_dir: str | os.PathLike, dim: int, seq: int):
        self.path = Path(emb_dir) / WAL_NAME
        good = sum(len(ln) for ln in self._good_lines(dim))
        self.file = open(self.path, "ab")
        self.file.truncate(good)
        self.file.seek(good)
        os.fsync(self.file.fileno())
        self.seq = seq

    def _good_lines(self, dim: int) -> list[bytes]:
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().splitlines(keepends=True)
        return lines[:len(read_wal(self.path, dim))]

    def append(self, change: Change) -> int:
        """Write one change and flush it to the disk -> its seq. When that fails (a full disk), whatever part of
        the line was written is cut off again, so that the next write does not follow half a line."""
        seq, end = self.seq + 1, self.file.tell()
        try:
            self.file.write(wal_line(seq, change).encode("utf-8"))
            self.file.flush()
            os.fsync(self.file.fileno())
        except BaseException:
            self.file.truncate(end)
            self.file.seek(end)
            raise
        self.seq = seq
        return seq


    def close(self) -> None:
        self.file.close()


def fold_log(emb_dir: str | os.PathLike, snap: Snapshot, applied: int) -> Snapshot:
    """When `applied` log lines were replayed into snap: write it as a new version, then empty the log. The
    caller holds the write lock."""
    if not applied:
        return snap
    snap = write_version(emb_dir, snap, {"from": WAL_NAME, "writes": applied})
    clear_log(emb_dir)
    return snap


def clear_log(emb_dir: str | os.PathLike) -> None:
    """Empty the log, once a committed version holds all its writes (meta.json's wal_applied: a crash before this
    leaves lines that loading skips)."""
    path = Path(emb_dir) / WAL_NAME
    if path.is_file():
        with open(path, "r+b") as f:
            f.truncate(0)
            os.fsync(f.fileno())


# -- embedding new texts as the folder records --------------------------------------------------

def folder_encoder(emb_dir: str | os.PathLike, meta: dict, model_dir=None, batch_size: int = 64, device=None):
    """A function texts -> embeddings [n, D] float32 made as the EMB_DIR's were: its model (meta.json's
    model_path unless model_dir; refused when its weights differ), pooling and max_length, rounded to its dtype."""

    model_dir = model_dir or meta.get("model_path")
    if model_dir is None:
        raise MixretError(f"{Path(emb_dir) / META_NAME}: names no model; pass --model DIR")
    model = load_model_checked(model_dir, meta, emb_dir)
    pooling, max_length = meta.get("pooling") or "last", meta.get("max_length") or model.config.context
    dev = pick_device(model, device)
    dtype = DTYPES[meta.get("dtype", "float32")]

    def encode(texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        E, truncated = encode_texts(model, texts, batch_size, max_length, pooling, dev)
        if truncated:
            warnings.warn(truncation_message(truncated, len(texts), max_length), stacklevel=2)
        return E.to(dtype).float().numpy()
    encode.model = model
    return encode


def read_ids(path: str | os.PathLike) -> list[str]:
    """One id a line (surrounding whitespace stripped, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise MixretError(f"{path}: ids file not found; expected a text file with one id a line")
    ids = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise MixretError(f"{where(path, n)}: not UTF-8 text; expected one id a line") from None
        if line:
            ids.append(line)
    if not ids:
        raise MixretError(f"{path}: no ids; expected one id a line")
    return ids


def update_folder(emb_dir: str | os.PathLike, add=None, delete=None, field_name: str = "text",
                  id_field: str = "id", model_dir=None, batch_size: int = 64, device=None) -> dict:
    """`mixret index EMB_DIR --add FILE --delete IDS_FILE`: delete the ids of IDS_FILE, then add the texts of FILE
    (replacing those whose id exists), embedding only them; write and commit the folder's next version
    -> {"added", "replaced", "deleted", "count", "version", "index": factory or None, "removed": vectors left in
    an approximate index}."""
    if add is None and delete is None:
        raise MixretError("nothing to update: give --add FILE and/or --delete IDS_FILE")
    with WriteLock(emb_dir):
        _, _, _, meta = load_emb_dir(emb_dir)
        snap, replayed = load_snapshot(emb_dir, with_index=has_index(emb_dir, meta))
        deletes = read_ids(delete) if delete is not None else []
        ids, texts, emb = [], [], None
        if add is not None:
            corpus = read_corpus(add, field_name, id_field)
            if corpus.skipped:
                warnings.warn(f"{add}: skipped {corpus.skipped} records with empty {field_name!r} text", stacklevel=2)
            ids, texts = corpus.ids, corpus.texts
            emb = folder_encoder(emb_dir, snap.meta, model_dir, batch_size, device)(texts)
        source = " and ".join(str(p) for p in (delete, add) if p is not None)
        applied = apply_change(snap, Change(deletes, ids, texts, emb), source=source)
        record = {**applied.counts, "from": source, "log_writes": replayed}
        new = write_version(emb_dir, applied.snapshot, record)
        if replayed:
            clear_log(emb_dir)
    index = new.index
    return {**applied.counts, "count": len(new.ids), "version": new.version,
            "index": None if index is None else index.factory, "removed": 0 if index is None else index.removed}
