"""Pairs and texts: formats, the TinyStoriesInstruct parser, splits, bad-input messages, the bundled corpus."""
import gzip
import json
import random
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixret import data
from mixret.data import (
    Pair,
    bundled_pairs_path,
    bundled_splits,
    load_pairs,
    load_texts,
    parse_tinystories_instruct,
    split_pairs,
    stable_id,
    write_pairs_jsonl,
)
from mixret.errors import MixretError

FIXTURES = Path(__file__).parent / "fixtures"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def rec(**kw) -> str:
    return json.dumps(kw)


# --- load_pairs: formats ---------------------------------------------------------------------

def test_load_pairs_jsonl_fixture():
    pairs = load_pairs(FIXTURES / "pairs.jsonl")
    assert [p.id for p in pairs] == ["hello", "grep", "sed"]
    assert pairs[0] == Pair("hello", "example package based on GNU autoconf",
                            "The GNU hello program produces a familiar, friendly greeting.")
    assert "\n" in pairs[1].target  # texts are kept exactly as written


def test_write_pairs_roundtrip_plain_and_gzip(tmp_path):
    pairs = load_pairs(FIXTURES / "pairs.jsonl")
    for name in ("out.jsonl", "sub/out.jsonl.gz"):
        path = tmp_path / name
        write_pairs_jsonl(pairs, path)
        assert load_pairs(path) == pairs
    with gzip.open(tmp_path / "sub/out.jsonl.gz", "rt", encoding="utf-8") as f:
        assert json.loads(f.readline()) == {"id": "hello", "summary": pairs[0].query, "document": pairs[0].target}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["out.jsonl", "out.jsonl.gz"]  # no temp files
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o044  # readable by others, not mkstemp's 0600


def test_write_pairs_custom_fields(tmp_path):
    path = tmp_path / "qa.jsonl"
    write_pairs_jsonl([Pair("1", "q", "t")], path, query_field="question", target_field="answer", id_field="key")
    assert json.loads(path.read_text()) == {"key": "1", "question": "q", "answer": "t"}
    assert load_pairs(path, query_field="question", target_field="answer", id_field="key") == [Pair("1", "q", "t")]


def test_load_pairs_parquet(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "summary": ["s1", "s2"], "document": ["d1", "d2"]}), path)
    assert load_pairs(path) == [Pair("a", "s1", "d1"), Pair("b", "s2", "d2")]


def test_load_pairs_parquet_missing_column_names_row(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"id": ["a"], "summary": ["s1"], "text": ["d1"]}), path)
    with pytest.raises(MixretError, match=rf"{path}:1: record has no target field 'document' \(fields: id, summary, text\)"):
        load_pairs(path)


def test_missing_id_field_uses_stable_hash_of_query(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [rec(summary="find files", document="a tool to find files")])
    [pair] = load_pairs(path)
    assert pair.id == stable_id("find files") == load_pairs(path)[0].id
    assert stable_id("hello world") == "878633aa32a3b150"  # pinned: ids must not change between versions


def test_numeric_ids_become_strings(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [rec(id=7, summary="q", document="t")])
    assert load_pairs(path) == [Pair("7", "q", "t")]


# --- load_pairs: bad input -------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(MixretError, match=r"nope\.jsonl: file not found"):
        load_pairs(tmp_path / "nope.jsonl")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("a,b\n")
    with pytest.raises(MixretError, match=r"pairs\.csv: unsupported file type '\.csv'; expected one of"):
        load_pairs(path)


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(MixretError, match=r"e\.jsonl: empty file"):
        load_pairs(tmp_path / "e.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(MixretError, match=r"blank\.jsonl: empty file \(no records\)"):
        load_pairs(tmp_path / "blank.jsonl")


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [rec(id="a", summary="q", document="t"), '{"id": "b", "summary": '])
    with pytest.raises(MixretError, match=rf"^{path}:2: invalid JSON \("):
        load_pairs(path)


def test_non_object_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['["a", "b"]'])
    with pytest.raises(MixretError, match=rf"{path}:1: expected a JSON object, got list"):
        load_pairs(path)


def test_missing_field_names_field_line_and_present_fields(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [rec(id="a", summary="q", document="t"), rec(id="b", title="q", document="t")])
    with pytest.raises(MixretError) as e:
        load_pairs(path)
    msg = str(e.value)
    assert f"{path}:2" in msg and "'summary'" in msg and "fields: id, title, document" in msg


def test_non_text_field(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [rec(id="a", summary=["q"], document="t")])
    with pytest.raises(MixretError, match=rf"{path}:1: field 'summary' should be text, got list"):
        load_pairs(path)


def test_empty_texts_are_skipped_with_a_counted_warning(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        rec(id="a", summary="q", document="t"),
        rec(id="b", summary="  ", document="t"),
        rec(id="c", summary="q2", document=""),
        rec(id="d", summary="q3", document=None),
    ])
    with pytest.warns(UserWarning, match=r"skipped 3 of 4 records with empty 'summary' or 'document' text"):
        pairs = load_pairs(path)
    assert [p.id for p in pairs] == ["a"]


def test_all_texts_empty_is_an_error(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [rec(id="a", summary="", document="t")])
    with pytest.raises(MixretError, match="no usable pairs"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_pairs(path)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(rec(id="a", summary="q", document="t").encode() + b"\n" + b'{"id": "b", "summary": "\xff"}\n')
    with pytest.raises(MixretError, match=rf"{path}:2: not valid UTF-8"):
        load_pairs(path)
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"Summary: s\nStory: \nline one\nbad \xc3\x28 byte\n<|endoftext|>\n")
    with pytest.raises(MixretError, match=rf"{txt}:4: not valid UTF-8"):
        load_pairs(txt)


def test_bad_gzip(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    path.write_text('{"id": "a"}\n')
    with pytest.raises(MixretError, match=r"p\.jsonl\.gz: cannot read .*expected a gzip-compressed file"):
        load_pairs(path)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        rec(id="a", summary="q1", document="t1"),
        rec(id="b", summary="q2", document="t2"),
        rec(id="a", summary="q3", document="t3"),
    ])
    with pytest.raises(MixretError, match=rf"{path}:3: duplicate id 'a' \(first at {path}:1\)"):
        load_pairs(path)


def test_repeated_text_with_derived_ids_is_skipped_with_warning(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [rec(summary="q", document="t1"), rec(summary="r", document="t2"),
                                              rec(summary="q", document="t3")])
    with pytest.warns(UserWarning, match=rf"skipped 1 records repeating .*query text \(first: {path}:3 repeats {path}:1\)"):
        pairs = load_pairs(path)
    assert [p.target for p in pairs] == ["t1", "t2"]


# --- TinyStoriesInstruct ---------------------------------------------------------------------

def test_tinystories_real_format_any_field_order():
    pairs, skipped = parse_tinystories_instruct((FIXTURES / "tinystories_instruct.txt").read_text())
    assert skipped == 1  # the record without a Summary
    assert len(pairs) == 3
    lily, tom, cat = pairs
    assert lily.query == "Lily finds a shiny red ball in the park and shares it with her friend Ben."
    assert lily.target.startswith("Once upon a time, there was a little girl named Lily.")
    assert lily.target.endswith("they played until the sun went down.")
    assert '"Look, Mom!" she said.\n\nHer friend Ben' in lily.target  # multi-line story, blank line kept
    assert "Dialogue" not in lily.target and "Summary" not in lily.target
    # Story before Summary, and a field label after the story ends it.
    assert tom.query == "Tom tries to fly like a bird, fails, and lands happily in a pile of leaves."
    assert tom.target.endswith("landed in a pile of soft leaves and laughed.")
    assert "Random sentence" not in tom.target and "orange" not in tom.target
    # Optional fields missing, story on the label line.
    assert cat.target == "The cat found a warm spot by the window. It slept there until dinner."
    assert [p.id for p in pairs] == [stable_id(p.target) for p in pairs]


def test_tinystories_crlf():
    pairs, skipped = parse_tinystories_instruct((FIXTURES / "tinystories_crlf.txt").read_bytes().decode())
    assert skipped == 1
    [dog] = pairs
    assert dog.query == "A dog learns to swim."
    assert dog.target == "Max the dog was afraid of the lake.\nOne day he jumped in and paddled to his friend."


def test_tinystories_edge_cases():
    assert parse_tinystories_instruct("") == ([], 0)
    assert parse_tinystories_instruct("<|endoftext|>\n\n<|endoftext|>") == ([], 0)  # empty records are not counted
    # No trailing separator; text before the first label belongs to no field; labels must start the line.
    pairs, skipped = parse_tinystories_instruct("noise\nSummary: s\nStory: a\nHe said Story: b\n  Words: x")
    assert skipped == 0
    assert pairs == [Pair(stable_id("a\nHe said Story: b\n  Words: x"), "s", "a\nHe said Story: b\n  Words: x")]
    # A label repeated within a record keeps its first value.
    assert parse_tinystories_instruct("Summary: s1\nStory: a\nSummary: s2")[0][0].query == "s1"
    # A record with a summary but an empty story is skipped.
    assert parse_tinystories_instruct("Summary: s\nStory: \n\n<|endoftext|>") == ([], 1)


def test_load_pairs_tinystories_file_warns_about_skipped_records():
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 records without a summary or a story"):
        pairs = load_pairs(FIXTURES / "tinystories_instruct.txt")
    assert pairs == parse_tinystories_instruct((FIXTURES / "tinystories_instruct.txt").read_text())[0]


def test_tinystories_repeated_story_is_skipped_with_line_numbers(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Summary: a\nStory: same\n<|endoftext|>\nSummary: b\nStory: other\n<|endoftext|>\n"
                    "Summary: c\nStory: same\n<|endoftext|>\n")
    with pytest.warns(UserWarning, match=rf"story text \(first: {path}:7 repeats {path}:1\)"):
        pairs = load_pairs(path)
    assert [p.query for p in pairs] == ["a", "b"]


# --- split_pairs -----------------------------------------------------------------------------

def test_split_is_deterministic_and_order_independent():
    pairs = [Pair(f"id-{i}", f"q{i}", f"t{i}") for i in range(2000)]
    train, test = split_pairs(pairs, 0.1)
    assert len(train) + len(test) == 2000 and not {p.id for p in train} & {p.id for p in test}
    assert 150 < len(test) < 250
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    train2, test2 = split_pairs(shuffled, 0.1)
    assert {p.id for p in test2} == {p.id for p in test}
    assert [p.id for p in test2] == [p.id for p in shuffled if p in set(test)]  # each side keeps input order
    # A pair's side does not depend on the other pairs.
    assert split_pairs([test[0]], 0.1) == ([], [test[0]])


def test_split_known_assignment():
    # Pinned: a change of hash function would silently move pairs between train and test.
    pairs = [Pair(i, "q", "t") for i in ("coreutils", "e", "hello", "grep", "0ad")]
    train, test = split_pairs(pairs, 0.1)
    assert [p.id for p in test] == ["coreutils", "e"]
    assert [p.id for p in train] == ["hello", "grep", "0ad"]
    assert [p.id for p in split_pairs(pairs, 0.5)[1]] == ["coreutils", "e", "grep"]


def test_split_bad_fraction():
    with pytest.raises(MixretError, match="test_fraction"):
        split_pairs([], 1.5)


# --- load_texts ------------------------------------------------------------------------------

def test_load_texts_txt_one_per_line(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("first doc\n\nsecond doc\r\nthird\n")
    ds = load_texts(path)
    assert ds.column_names == ["text"]
    assert ds["text"] == ["first doc", "second doc", "third"]


def test_load_texts_txt_endoftext(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_bytes(b"Once there was\r\na cat.<|endoftext|>\r\nA dog ran.\n<|endoftext|>Mid <|endoftext|> line\n")
    assert load_texts(str(path))["text"] == ["Once there was\na cat.", "A dog ran.", "Mid", "line"]
    ds = load_texts(FIXTURES / "tinystories_instruct.txt")
    assert len(ds) == 4 and ds[0]["text"].startswith("Summary: Lily")


def test_load_texts_jsonl_gz_parquet_and_concatenation(tmp_path):
    write_lines(tmp_path / "a.jsonl", [rec(text="a1"), rec(text="a2")])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(rec(text="b1") + "\n")
    pq.write_table(pa.table({"text": ["c1", "c2"], "other": [1, 2]}), tmp_path / "c.parquet")
    ds = load_texts([tmp_path / "c.parquet", tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"])
    assert ds["text"] == ["c1", "c2", "a1", "a2", "b1"]


def test_load_texts_folder_is_sorted_recursive_and_skips_others(tmp_path):
    write_lines(tmp_path / "b.jsonl", [rec(text="b")])
    write_lines(tmp_path / "a.txt", ["a"])
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"text": ["s"]}), tmp_path / "sub" / "0.parquet")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.txt").write_text("ignored")
    assert load_texts(tmp_path)["text"] == ["a", "b", "s"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixretError, match=r"empty: folder has no .jsonl"):
        load_texts(tmp_path / "empty")


def test_load_texts_several_fields_of_a_pairs_file(tmp_path):
    ds = load_texts([FIXTURES / "pairs.jsonl"], text_field=["summary", "document"])
    pairs = load_pairs(FIXTURES / "pairs.jsonl")
    assert ds["text"] == [t for p in pairs for t in (p.query, p.target)]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"summary": ["s1", "s2", ""], "document": ["d1", None, "d3"]}), path)
    with pytest.warns(UserWarning, match=r"p\.parquet: skipped 2 empty texts"):
        assert load_texts(path, text_field=["summary", "document"])["text"] == ["s1", "d1", "s2", "d3"]


def test_load_texts_errors(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [rec(text="ok"), rec(body="x")])
    with pytest.raises(MixretError, match=rf"{path}:2: record has no text field 'text' \(fields: body\)"):
        load_texts(path)
    bad = write_lines(tmp_path / "bad.jsonl", [rec(text="ok"), "{oops"])
    with pytest.raises(MixretError, match=rf"{bad}:2: invalid JSON"):
        load_texts(bad)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(MixretError, match=r"c\.parquet: no column 'text' \(columns: body\)"):
        load_texts(tmp_path / "c.parquet")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(MixretError, match=r"blank\.txt: no texts found"):
        load_texts(tmp_path / "blank.txt")
    with pytest.raises(MixretError, match=r"missing\.jsonl: file not found"):
        load_texts(tmp_path / "missing.jsonl")
    with pytest.raises(MixretError, match="no sources given"):
        load_texts([])


def test_load_texts_empty_texts_warn(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [rec(text="ok"), rec(text=" "), rec(text=None)])
    with pytest.warns(UserWarning, match=r"a\.jsonl: skipped 2 empty texts"):
        assert load_texts(path)["text"] == ["ok"]


def test_load_texts_hub_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("someone/tiny-stories")["text"] == ["x", "y"]
    assert calls == [("someone/tiny-stories", "train")]
    with pytest.raises(MixretError, match=r"someone/tiny-stories: dataset has no column 'story' \(columns: text, label\)"):
        load_texts("someone/tiny-stories", text_field="story")

    def failing(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(MixretError, match=r"nobody/nothing: not a local file or folder.*ConnectionError: offline"):
        load_texts("nobody/nothing")


# --- bundled corpus --------------------------------------------------------------------------

def test_bundled_corpus():
    path = bundled_pairs_path()
    assert path.name == "debian-pairs.jsonl.gz" and path.stat().st_size < 4_000_000
    pairs = load_pairs(path)
    assert len(pairs) == 19522          # the 8,000-pair sample, then 11,522 extra training pairs
    assert len({p.id for p in pairs}) == 19522
    assert len({p.query for p in pairs}) == 19522 and len({p.target for p in pairs}) == 19522
    assert min(len(p.target) for p in pairs) >= 40
    train, test = bundled_splits()
    assert (len(train), len(test)) == (18733, 789)
    assert split_pairs(pairs) == (train, test)
    assert split_pairs(pairs[:8000])[1] == test     # every test pair comes from the sample


def test_bundled_corpus_missing(monkeypatch):
    monkeypatch.setattr(data, "BUNDLED_PAIRS_NAME", "not-there.jsonl.gz")
    with pytest.raises(MixretError, match=r"not-there\.jsonl\.gz: bundled corpus not found.*pip install -e \."):
        bundled_pairs_path()


def test_prepare_data_script(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", Path(__file__).parent.parent / "scripts" / "prepare_data.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    long = "a long enough description of the package, more than forty characters"
    rows = [{"id": f"p{i}", "source": f"s{i}", "summary": f"summary {i}", "document": f"{long} {i}"} for i in range(20)]
    rows += [
        {"id": "short", "source": "x", "summary": "short doc", "document": "too short"},
        {"id": "dupdoc", "source": "x", "summary": "other summary", "document": rows[0]["document"].upper()},
        {"id": "dupsum", "source": "x", "summary": " Summary  1", "document": f"{long} unique"},
    ]
    src = tmp_path / "src.jsonl"
    write_lines(src, [json.dumps(r) for r in reversed(rows)])
    prepare.main([str(src), "--out", str(tmp_path / "a"), "--n", "10"])
    write_lines(src, [json.dumps(r) for r in rows])  # input order must not matter
    prepare.main([str(src), "--out", str(tmp_path / "b"), "--n", "10"])
    out_a, out_b = (tmp_path / d / "debian-pairs.jsonl.gz" for d in "ab")
    assert out_a.read_bytes() == out_b.read_bytes()
    pairs = load_pairs(out_a)
    assert len(pairs) == 10
    assert not {"short"} & {p.id for p in pairs}
    assert sum(p.id in ("p0", "dupdoc") for p in pairs) <= 1 and sum(p.id in ("p1", "dupsum") for p in pairs) <= 1
    assert [p.id for p in pairs] != sorted(p.id for p in pairs)  # a hashed sample, not alphabetical
    prepare.main([str(src), "--out", str(tmp_path / "c"), "--n", "100"])  # asks for more than there are
    everything = load_pairs(tmp_path / "c" / "debian-pairs.jsonl.gz")
    assert len(everything) == 20  # 23 rows less the short one and one of each repeated pair

    # --extra-train: the sample, then the other usable pairs of the bundled split's training side
    prepare.main([str(src), "--out", str(tmp_path / "d"), "--n", "10", "--extra-train"])
    extended = load_pairs(tmp_path / "d" / "debian-pairs.jsonl.gz")
    assert extended[:10] == pairs
    extra = extended[10:]
    assert extra and {p.id for p in extra} <= {p.id for p in everything} - {p.id for p in pairs}
    assert split_pairs(extra) == (extra, [])
    _, everything_test = split_pairs(everything)
    assert split_pairs(extended)[1] == split_pairs(pairs)[1]       # the same test split as the sample's
    assert len(extended) == 20 - sum(p.id not in {q.id for q in pairs} for p in everything_test)
