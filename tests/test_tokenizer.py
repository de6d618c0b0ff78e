import pytest

from mixret.errors import MixretError
from mixret.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer, make_tokenizer

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


def test_bpe_words_are_the_same_tokens_wherever_they_stand(tmp_path):
    corpus = ["Print debugging library for Go", "a library to print values when debugging Go programs"] * 40
    tok = BPETokenizer.train(corpus, vocab_size=300)
    assert tok.encode("Go")[-1:] == tok.encode("for Go")[-1:]         # a text's first word as inside a text
    assert tok.encode("Print") != tok.encode("print")                  # bpe keeps case
    lower = BPETokenizer.train(corpus, vocab_size=300, lowercase=True)
    assert lower.encode("Print debugging") == lower.encode("print debugging")
    assert lower.decode(lower.encode("Print Go")) == "print go"
    lower.save(tmp_path / "tokenizer.json")                            # the folding travels with the file
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("PRINT") == lower.encode("print")


def test_make_tokenizer_kinds(tmp_path):
    texts = ["Alpha Beta gamma", "beta GAMMA delta"] * 30
    said = []
    assert isinstance(make_tokenizer("bytes", 300, lambda: texts, said.append), ByteTokenizer)
    lower = make_tokenizer("bpe-lower", 300, lambda: texts, said.append)
    cased = make_tokenizer("bpe", 300, lambda: texts, said.append)
    assert lower.encode("Alpha") == lower.encode("alpha") and cased.encode("Alpha") != cased.encode("alpha")
    assert said == ["training a BPE tokenizer (300 tokens, lowercased) on the training texts",
                    "training a BPE tokenizer (300 tokens) on the training texts"]
    lower.save(tmp_path / "t.json")
    assert make_tokenizer(str(tmp_path / "t.json"), 300, lambda: [], said.append).encode("BETA") == lower.encode("beta")
    with pytest.raises(MixretError, match="not found"):
        make_tokenizer(str(tmp_path / "missing.json"), 300, lambda: [])


def test_byte_tokenizer_saves_and_loads(tmp_path):
    ByteTokenizer().save(tmp_path / "t.json")
    assert isinstance(load_tokenizer(tmp_path / "t.json"), ByteTokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(MixretError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(MixretError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
