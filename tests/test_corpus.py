"""`mixret index EMB_DIR --add/--delete`: an update equals a rebuild, and a failure at any step leaves the old
corpus or the new one.

The corpus: 50 bundled documents embedded by a tiny untrained model (context 64), so every step takes milliseconds.
"""
import json
import os
import shutil
import warnings

import numpy as np
import pytest
from close import assert_close
from test_search import invoke, tiny_lm

from mixret.errors import MixretError
from mixret.retrieval import corpus as corpus_mod
from mixret.retrieval.embeddings import load_emb_dir
from mixret.retrieval.search import load_corpus

QUERIES = ["Perl bindings for OpenLDAP", "a puzzle game", "library for parsing XML", "music player", "Python"]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    return path


def embed(root, docs, name, factory="Flat"):
    """docs embedded by root/lm into root/name and indexed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # documents longer than the tiny context
        res = invoke("embed", write_jsonl(root / f"{name}.jsonl", docs), "--model", root / "lm", "--out", root / name)
        assert res.exit_code == 0, res.output
        res = invoke("index", root / name, "--factory", factory)
        assert res.exit_code == 0, res.output
    return root / name


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    from mixret.data import bundled_pairs_path, load_pairs
    root = tmp_path_factory.mktemp("corpus")
    tiny_lm(32, 0).save_pretrained(root / "lm")
    pairs = load_pairs(bundled_pairs_path())[:56]
    return root, [(p.id, p.target) for p in pairs]


def update(emb_dir, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return invoke("index", emb_dir, *args)


def searches(emb_dir):
    """Every query's (ids, scores) in vector, bm25 and fusion mode (weight 0.5)."""
    c = load_corpus(emb_dir, ["vector", "bm25", "fusion"], fusion_weight=0.5)
    q = c.encode(QUERIES)
    out = {}
    for mode in ("vector", "bm25", "fusion"):
        res = c.retriever.search(mode, 8, query_emb=q, queries=QUERIES)
        out[mode] = ([[c.ids[i] for i in row] for row in res.indices], res.scores)
    return out


def assert_same_searches(a, b):
    for mode in a:
        assert a[mode][0] == b[mode][0], mode
        assert_close(a[mode][1], b[mode][1], name=mode)


def assert_same_folder(a, b):
    ea, ia, ta, _ = load_emb_dir(a)
    eb, ib, tb, _ = load_emb_dir(b)
    assert ia == ib and ta == tb
    assert_close(ea, eb)
    assert_same_searches(searches(a), searches(b))


def test_add_then_delete_equal_rebuilds(docs, tmp_path):
    root, all_docs = docs
    shutil.copytree(root / "lm", tmp_path / "lm")
    base, extra = all_docs[:40], all_docs[40:50]
    emb = embed(tmp_path, base, "emb")
    # two texts replace those of existing ids (in their rows), ten are new (after the last row)
    replacing = [(base[3][0], all_docs[50][1]), (base[17][0], all_docs[51][1])]
    res = update(emb, "--add", write_jsonl(tmp_path / "add.jsonl", extra + replacing))
    assert res.exit_code == 0, res.output
    assert "10 added, 2 replaced, 0 deleted; 50 texts, version 1; Flat index" in res.output
    union = [(i, dict(replacing).get(i, t)) for i, t in base] + extra
    assert_same_folder(emb, embed(tmp_path, union, "union"))
    meta = json.loads((emb / "meta.json").read_text())
    assert meta["version"] == 1 and meta["count"] == 50 and meta["last_update"]["added"] == 10

    gone = [base[0][0], base[17][0], extra[4][0]]
    (tmp_path / "gone.txt").write_text("\n".join(gone) + "\n\n")
    res = update(emb, "--delete", tmp_path / "gone.txt")
    assert res.exit_code == 0 and "0 added, 0 replaced, 3 deleted; 47 texts, version 2" in res.output, res.output
    assert_same_folder(emb, embed(tmp_path, [d for d in union if d[0] not in gone], "rest"))
    # only the current version and the one before it are kept
    names = sorted(p.name for p in emb.iterdir())
    assert "embeddings.safetensors" not in names and {"embeddings.1.safetensors", "embeddings.2.safetensors"} <= set(names)
    res = invoke("search", "perl", "--index", emb, "--mode", "bm25", "-k", 3)
    assert res.exit_code == 0, res.output


def test_bad_updates_say_what_was_expected_and_change_nothing(docs, tmp_path):
    root, all_docs = docs
    shutil.copytree(root / "lm", tmp_path / "lm")
    emb = embed(tmp_path, all_docs[:10], "emb")
    before = sorted(p.name for p in emb.iterdir()), (emb / "meta.json").read_text()
    (tmp_path / "ids.txt").write_text(f"{all_docs[0][0]}\nno-such-id\n")
    res = update(emb, "--delete", tmp_path / "ids.txt")
    assert res.exit_code == 1 and "cannot delete 'no-such-id': no such id in the corpus" in res.output
    (tmp_path / "all.txt").write_text("\n".join(i for i, _ in all_docs[:10]))
    res = update(emb, "--delete", tmp_path / "all.txt")
    assert res.exit_code == 1 and "would leave the corpus empty" in res.output
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "text": "fine"}\n{"id": "y"\n')
    res = update(emb, "--add", tmp_path / "bad.jsonl")
    assert res.exit_code == 1 and "bad.jsonl:2" in res.output, res.output
    res = update(emb, "--delete", tmp_path / "missing.txt")
    assert res.exit_code != 0 and "missing.txt" in res.output
    with corpus_mod.WriteLock(emb):   # another writer holds the folder
        res = update(emb, "--add", write_jsonl(tmp_path / "ok.jsonl", [("new", "a new text")]))
        assert res.exit_code == 1 and "another process is writing this EMB_DIR" in res.output
    assert (sorted(p.name for p in emb.iterdir()), (emb / "meta.json").read_text()) == before


class Crash(BaseException):
    """Stands for the process dying: nothing catches it."""


def test_a_failure_at_any_step_leaves_the_old_or_the_new_corpus(docs, tmp_path, monkeypatch):
    """Fail the update at each of its flushes and renames in turn: the folder always loads, as the old corpus or
    the new one; the first failures leave the old one, the last the new one, and the next update succeeds."""
    root, all_docs = docs
    shutil.copytree(root / "lm", tmp_path / "lm")
    emb = embed(tmp_path, all_docs[:20], "emb", factory="HNSW16")
    add = write_jsonl(tmp_path / "add.jsonl", all_docs[20:25] + [(all_docs[2][0], "replaced text")])
    old = load_emb_dir(emb)[1:3]
    real_fsync, real_replace = os.fsync, os.replace
    outcomes = []
    for step in range(1, 100):
        calls = [0]

        def counted(real):
            def call(*args):
                calls[0] += 1
                if calls[0] == step:
                    raise Crash()
                return real(*args)
            return call
        monkeypatch.setattr(os, "fsync", counted(real_fsync))
        monkeypatch.setattr(os, "replace", counted(real_replace))
        try:
            corpus_mod.update_folder(emb, add=add)
            crashed = False
        except Crash:
            crashed = True
        finally:
            monkeypatch.setattr(os, "fsync", real_fsync)
            monkeypatch.setattr(os, "replace", real_replace)
        state = load_emb_dir(emb)[1:3]
        assert state == old or (state[0] == old[0] + [d[0] for d in all_docs[20:25]]
                                and state[1][2] == "replaced text"), f"step {step}: neither old nor new"
        load_corpus(emb, ["vector"])  # the index of that version loads with it
        outcomes.append(state == old)
        if not crashed:
            break
        if state != old:   # committed: go back to the old corpus for the next step
            shutil.rmtree(emb)
            embed(tmp_path, all_docs[:20], "emb", factory="HNSW16")
    assert outcomes[0] and not outcomes[-1] and len(outcomes) > 6, outcomes
    first_new = outcomes.index(False)
    assert all(outcomes[:first_new]) and not any(outcomes[first_new:]), outcomes  # old, then new: one commit


def test_approximate_index_keeps_its_training_and_hides_removed_vectors(docs, tmp_path):
    root, all_docs = docs
    shutil.copytree(root / "lm", tmp_path / "lm")
    emb = embed(tmp_path, all_docs[:40], "emb", factory="HNSW16")
    res = update(emb, "--add", write_jsonl(tmp_path / "add.jsonl", all_docs[40:46] + [(all_docs[5][0], "new text")]))
    assert res.exit_code == 0 and "HNSW16 index, 1 removed vectors still in it" in res.output, res.output
    (tmp_path / "gone.txt").write_text(f"{all_docs[1][0]}\n{all_docs[41][0]}\n")
    res = update(emb, "--delete", tmp_path / "gone.txt")
    assert res.exit_code == 0 and "3 removed vectors still in it" in res.output, res.output
    c = load_corpus(emb, ["vector"])
    index = c.retriever.index
    assert index.count == 44 and index.removed == 3 and index.index.ntotal == 47
    # every document finds itself, deleted and replaced vectors are never returned, and k = corpus size works
    res = c.retriever.search("vector", 44, query_emb=c.snapshot.emb, queries=c.texts)
    assert (res.indices[:, 0] == np.arange(44)).all()
    assert all(sorted(row) == list(range(44)) for row in res.indices.tolist())
    # a rebuild of the updated folder leaves nothing behind
    res = update(emb, "--factory", "HNSW16")
    assert res.exit_code == 0, res.output
    assert load_corpus(emb, ["vector"]).retriever.index.removed == 0


def test_index_help_says_when_to_rebuild():
    res = invoke("index", "--help")
    assert "--add" in res.output and "--delete" in res.output and "Rebuild it" in res.output



def test_write_ahead_log_replays_whole_writes_and_drops_a_cut_short_last_one(docs, tmp_path):
    """Writes logged by WriteLog are applied when the folder loads (no model needed: the log holds their
    embeddings); a last line cut short at any byte is a write never acknowledged and is dropped; a damaged line
    before the last is an error naming it."""
    root, all_docs = docs
    shutil.copytree(root / "lm", tmp_path / "lm")
    emb = embed(tmp_path, all_docs[:10], "emb")
    snap, _ = corpus_mod.load_snapshot(emb)
    rng = np.random.default_rng(0)
    changes = [corpus_mod.Change([], ["a", "b"], ["text a", "text b"], rng.standard_normal((2, 32), np.float32)),
               corpus_mod.Change([all_docs[0][0]], ["a"], ["text a again"], rng.standard_normal((1, 32), np.float32))]
    log = corpus_mod.WriteLog(emb, 32, snap.seq)
    for change in changes:
        log.append(change)
    log.close()
    expected = snap
    for seq, change in enumerate(changes, 1):
        expected = corpus_mod.apply_change(expected, change, seq).snapshot
    loaded, replayed = corpus_mod.load_snapshot(emb)
    assert replayed == 2 and loaded.ids == expected.ids and loaded.texts == expected.texts and loaded.seq == 2
    np.testing.assert_array_equal(loaded.emb, expected.emb)
    assert load_corpus(emb, ["bm25"]).ids == expected.ids     # `mixret search` sees the logged writes

    wal = emb / corpus_mod.WAL_NAME
    whole = wal.read_bytes()
    first = whole.index(b"\n") + 1
    for cut in range(first + 1, len(whole), max(1, (len(whole) - first) // 40)):   # the second write cut short
        wal.write_bytes(whole[:cut])
        loaded, replayed = corpus_mod.load_snapshot(emb)
        assert replayed == 1 and loaded.ids == snap.ids + ["a", "b"], cut
    corpus_mod.WriteLog(emb, 32, 1).close()   # opened for writing: the cut-short line is cut off
    assert wal.read_bytes() == whole[:first]
    wal.write_bytes(whole[:first].replace(b"text a", b"text A") + whole[first:])
    with pytest.raises(MixretError, match=r"writes.wal:1: damaged line in the write-ahead log"):
        corpus_mod.load_snapshot(emb)

    # folding: the writes become a version of the folder and the log is emptied; nothing is applied twice
    wal.write_bytes(whole)
    with corpus_mod.WriteLock(emb):
        snap2, replayed = corpus_mod.load_snapshot(emb)
        corpus_mod.fold_log(emb, snap2, replayed)
    assert wal.read_bytes() == b"" and json.loads((emb / "meta.json").read_text())["wal_applied"] == 2
    wal.write_bytes(whole)   # as if the process died after the commit, before emptying the log
    again, replayed = corpus_mod.load_snapshot(emb)
    assert replayed == 0 and again.ids == expected.ids


def test_a_failed_log_append_leaves_no_half_line(docs, tmp_path, monkeypatch):
    root, all_docs = docs
    shutil.copytree(root / "lm", tmp_path / "lm")
    emb = embed(tmp_path, all_docs[:5], "emb")
    change = corpus_mod.Change([], ["a"], ["text a"], np.ones((1, 32), np.float32))
    log = corpus_mod.WriteLog(emb, 32, 0)
    log.append(change)
    size = (emb / corpus_mod.WAL_NAME).stat().st_size

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        log.append(corpus_mod.Change([], ["b"], ["text b"], np.ones((1, 32), np.float32)))
    monkeypatch.undo()
    assert (emb / corpus_mod.WAL_NAME).stat().st_size == size and log.seq == 1
    log.append(corpus_mod.Change([], ["c"], ["text c"], np.ones((1, 32), np.float32)))
    log.close()
    snap, replayed = corpus_mod.load_snapshot(emb)
    assert replayed == 2 and snap.ids[-2:] == ["a", "c"] and snap.seq == 2


@pytest.mark.parametrize("k1,b,stemmer", [(1.5, 0.75, True), (0.9, 0.3, False)])
def test_bm25_from_kept_term_statistics_equals_a_fresh_index(k1, b, stemmer):
    """The BM25 serve keeps (term statistics, updated after each write) scores every text exactly as a BM25
    built from the texts of that moment."""
    from mixret.data import bundled_pairs_path, load_pairs
    from mixret.retrieval.bm25 import BM25Index
    texts = [p.target for p in load_pairs(bundled_pairs_path())[:300]] + ["the of and", "zebra"]
    kept = BM25Index(texts, k1, b, stemmer, keep_terms=True)
    queries = [" ".join(t.split()[:4]) for t in texts[::25]] + ["zebra", "the", "zebra perl library"]
    for index, corpus in ((kept, texts), (None, None)):
        if index is None:   # delete rows 10-19, replace row 5, add two texts
            corpus = texts[:10] + texts[20:] + ["a zebra library", "perl perl perl"]
            corpus[5] = "a new text for row five"
            keep = np.r_[np.arange(10), np.full(10, -1), np.arange(10, len(texts) - 10)]
            keep[5] = -1
            index = kept.updated(keep, corpus, np.array([5, len(corpus) - 2, len(corpus) - 1]))
        fresh = BM25Index(corpus, k1, b, stemmer)
        for q in queries:
            np.testing.assert_array_equal(index.scores(q), fresh.scores(q))
        np.testing.assert_array_equal(index.search(queries, 10)[1], fresh.search(queries, 10)[1])


KILL_AT = """
import os, sys
step, calls = int(sys.argv[1]), [0]
def dying(real):
    def call(*args):
        calls[0] += 1
        if calls[0] == step:
            os._exit(137)              # the process dies here: no cleanup, no finally
        return real(*args)
    return call
os.fsync, os.replace = dying(os.fsync), dying(os.replace)
from mixret.retrieval.corpus import update_folder
update_folder(sys.argv[2], add=sys.argv[3])
"""


def killed_update(emb, add, step: int) -> int:
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", KILL_AT, str(step), str(emb), str(add)], env=env,
                          capture_output=True, timeout=120).returncode


@pytest.mark.parametrize("steps", [pytest.param(None, marks=pytest.mark.slow), (7,)])
def test_a_process_killed_at_any_step_leaves_the_old_or_the_new_corpus(docs, tmp_path, steps):
    """`update_folder` in a process that dies (os._exit) at its n-th flush or rename, for every n (slow) or one in
    the middle: the folder loads as the old corpus or the new one, and the next update cleans up what the dead one
    left and succeeds."""
    root, all_docs = docs
    shutil.copytree(root / "lm", tmp_path / "lm")
    base = embed(tmp_path, all_docs[:20], "emb")
    shutil.copytree(base, tmp_path / "pristine")
    add = write_jsonl(tmp_path / "add.jsonl", all_docs[20:24] + [(all_docs[3][0], "replaced text")])
    old = load_emb_dir(base)[1:3]
    seen = set()
    for step in steps or range(1, 60):
        shutil.rmtree(base)
        shutil.copytree(tmp_path / "pristine", base)
        code = killed_update(base, add, step)
        state = load_emb_dir(base)[1:3]
        new = state[0] == old[0] + [d[0] for d in all_docs[20:24]] and state[1][3] == "replaced text"
        assert state == old or new, f"step {step}: neither old nor new"
        load_corpus(base, ["vector"])
        seen.add("new" if new else "old")
        if code == 0:
            break
        assert code == 137
        corpus_mod.update_folder(base, add=add)   # the next update: it cleans up and succeeds
        assert not [p.name for p in base.iterdir() if p.name.endswith(".tmp")]
        assert load_emb_dir(base)[1][-4:] == [d[0] for d in all_docs[20:24]]
    assert steps or seen == {"old", "new"}
