import pytest

from mixret.errors import MixretError
from mixret.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

TEXTS = ["Once upon a time, there was a little robot.", "naïve café — 日本語 🙂", "tabs\tand\nnewlines\r\n",
         "  leading and trailing spaces  ", ""]


def test_byte_tokenizer_round_trips_exactly():
    tok = ByteTokenizer()
    for t in TEXTS:
        ids = tok.encode(t)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == t
    assert len({tok.pad_id, tok.bos_id, tok.eos_id} & set(range(256))) == 0
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert tok.vocab_size == 259
    assert tok.decode(tok.encode("ab") + [tok.eos_id, tok.pad_id]) == "ab"


def test_bpe_trains_round_trips_and_saves(tmp_path):
    corpus = [f"package {i} provides a library for parsing {w} files" for i, w in
              enumerate(["json", "xml", "yaml", "toml"] * 50)] + TEXTS
    tok = BPETokenizer.train(corpus, vocab_size=400)
    assert tok.vocab_size <= 400
    for t in TEXTS + corpus[:3]:
        assert tok.decode(tok.encode(t)) == t
    assert len(tok.encode(corpus[0])) < len(corpus[0].encode()) / 2  # it actually merged
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(corpus[5]) == tok.encode(corpus[5])
    assert (again.pad_id, again.bos_id, again.eos_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    assert tok.encode_batch(corpus[:2]) == [tok.encode(corpus[0]), tok.encode(corpus[1])]


def test_byte_tokenizer_saves_and_loads(tmp_path):
    ByteTokenizer().save(tmp_path / "t.json")
    assert isinstance(load_tokenizer(tmp_path / "t.json"), ByteTokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(MixretError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(MixretError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
