import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from close import assert_close

import mixret
import mixret.retrieval.embeddings as embed
from mixret.cli import main
from mixret.data import load_pairs
from mixret.errors import MixretError
from mixret.models import VARIANTS, ModelConfig, build_model
from mixret.models.encode import encode
from mixret.retrieval.embeddings import embed_corpus, load_emb_dir
from mixret.tokenizer import ByteTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(vocab_size=260, d_model=32, n_layers=2, context=32)
TOK = ByteTokenizer()
# the fixture documents are longer than the tiny context; tests that check the warning use pytest.warns
pytestmark = pytest.mark.filterwarnings("ignore:.*were truncated:UserWarning")

TEXTS = ["hello world", "a", "the quick brown fox jumps", "xyz", "mixers mix tokens", "b c"]


def make(variant="masked-mixer (flat)", **overrides):
    torch.manual_seed(1)
    model = build_model(ModelConfig(**{**TINY, **VARIANTS[variant], **overrides})).eval()
    model.tokenizer = TOK
    return model


def hidden_of(model, ids):
    """Last-layer hidden states of one unpadded sequence: [L, D]."""
    with torch.no_grad():
        return model.hidden(torch.tensor([ids]))[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    make().save_pretrained(d)
    return d


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- encode -----------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["last", "eos", "mean"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_equals_each_text_alone(variant, pooling):
    model = make(variant)
    texts = TEXTS + ["long " * 20]  # one text is truncated to the context
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = encode(model, texts, batch_size=4, pooling=pooling)
        alone = np.stack([encode(model, t, pooling=pooling) for t in texts])
    assert batched.shape == (len(texts), TINY["d_model"]) and batched.dtype == np.float32
    assert_close(batched, alone)
    assert len({row.tobytes() for row in batched}) == len(texts)  # distinct texts, distinct rows


def test_pooling_positions():
    model = make()
    text = "hello"
    ids = [TOK.bos_id] + TOK.encode(text)
    h = hidden_of(model, ids)
    h_eos = hidden_of(model, ids + [TOK.eos_id])
    batch = [text, "a longer one: padding"]
    last, eos, mean = (encode(model, batch, pooling=p)[0] for p in ("last", "eos", "mean"))
    assert_close(last, h[len(ids) - 1].numpy())
    assert_close(eos, h_eos[-1].numpy())
    assert_close(mean, h[1:].mean(0).numpy())  # the content tokens: bos is left out
    assert not np.allclose(last, eos, atol=1e-3)  # the two positions really differ


def test_mean_pooling_leaves_out_bos():
    """bos comes first in every text, so a causal model's output there is the same for all of them: the mean
    must average the content tokens only."""
    model = make()
    texts = ["first text", "another, longer second text"]
    hs = [hidden_of(model, [TOK.bos_id] + TOK.encode(t)) for t in texts]
    assert torch.equal(hs[0][0], hs[1][0])  # the bos state is shared
    mean = encode(model, texts, pooling="mean")
    for row, h in zip(mean, hs):
        assert_close(row, h[1:].mean(0))
        assert not np.allclose(row, h.mean(0).numpy(), rtol=1e-3, atol=0)


def test_output_order_equals_input_order_after_length_sorting():
    model = make("llama")
    texts = ["x" * n for n in (3, 17, 1, 9, 25, 5, 12)]
    shapes = []
    embed_fn = model.embed
    model.embed = lambda ids, mask: (shapes.append((ids.shape, mask.sum(1).tolist())), embed_fn(ids, mask))[1]
    E = encode(model, texts, batch_size=3)
    # batches were built longest first, so each is padded only to its own longest text
    assert [s[1] for s in shapes] == [[26, 18, 13], [10, 6, 4], [2]]
    assert [s[0][1] for s in shapes] == [26, 10, 2]
    for i, t in enumerate(texts):  # row i is text i
        assert_close(E[i], hidden_of(model, [TOK.bos_id] + TOK.encode(t))[-1].numpy())


def test_truncation_keeps_first_tokens_and_warns_with_count():
    model = make()
    long = "abcdefghij" * 5  # 50 bytes
    with pytest.warns(UserWarning, match=r"1 of 2 texts were longer than 32 tokens"):
        E = encode(model, [long, "short"])
    ids = ([TOK.bos_id] + TOK.encode(long))[:32]
    assert_close(E[0], hidden_of(model, ids)[-1].numpy())
    # eos pooling keeps the eos at the end of a truncated text
    with pytest.warns(UserWarning, match="1 of 1"):
        e = encode(model, long, pooling="eos", max_length=10)
    ids = [TOK.bos_id] + TOK.encode(long)[:8] + [TOK.eos_id]
    assert_close(e, hidden_of(model, ids)[-1].numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode(model, "short")  # no warning when nothing is truncated


def test_encode_options_and_model_method():
    model = make()
    E = model.encode(TEXTS, batch_size=2)
    assert_close(E, encode(model, TEXTS))
    t = model.encode(TEXTS, convert_to_numpy=False, normalize_embeddings=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (len(TEXTS), 32)
    assert_close(t.norm(dim=1), torch.ones(len(TEXTS)))
    assert_close(t.numpy(), E / np.linalg.norm(E, axis=1, keepdims=True))
    assert model.encode("hello").shape == (32,)


def test_encode_uses_eval_mode_and_restores_training_mode():
    model = make(dropout=0.5).train()
    a, b = encode(model, TEXTS), encode(model, TEXTS)
    np.testing.assert_array_equal(a, b)  # dropout off while encoding
    assert model.training


def test_encode_errors():
    model = make()
    with pytest.raises(MixretError, match="text 2 is empty"):
        encode(model, ["a", "b", "", "c"])
    with pytest.raises(MixretError, match="text 1 is empty"):
        encode(model, ["a", "  \n"])
    with pytest.raises(MixretError, match="text 0 is a int"):
        encode(model, [3])
    with pytest.raises(MixretError, match="unknown pooling"):
        encode(model, ["a"], pooling="first")
    with pytest.raises(MixretError, match="max_length must be between 2 and the model's context 32"):
        encode(model, ["a"], max_length=33)
    with pytest.raises(MixretError, match="between 3"):
        encode(model, ["a"], max_length=2, pooling="eos")
    model.tokenizer = None
    with pytest.raises(MixretError, match="no tokenizer"):
        encode(model, ["a"])


def test_mixret_load_then_encode(model_dir):
    model = mixret.load(model_dir)
    assert_close(model.encode(TEXTS, batch_size=64, normalize_embeddings=False, convert_to_numpy=True),
                 encode(make(), TEXTS))


# --- embed_corpus / EMB_DIR --------------------------------------------------------------------

def test_embed_pairs_file_fields_and_meta(model_dir, tmp_path):
    pairs = load_pairs(FIXTURES / "pairs.jsonl")
    model = mixret.load(model_dir)
    for field, truncated in (("summary", 2), ("document", 3)):
        with pytest.warns(UserWarning, match=f"pairs.jsonl: {truncated} of 3 texts were longer than 32 tokens"):
            meta = embed_corpus(model_dir, FIXTURES / "pairs.jsonl", tmp_path / field, field=field)
        E, ids, texts, meta2 = load_emb_dir(tmp_path / field)
        assert meta == meta2 and meta["truncated"] == truncated
        assert ids == [p.id for p in pairs]
        assert texts == [p.query if field == "summary" else p.target for p in pairs]
        with pytest.warns(UserWarning):
            assert_close(E, model.encode(texts))
        assert meta["model_path"] == str(model_dir.resolve()) and Path(meta["model_path"]).is_absolute()
        assert meta["model_hash"] == mixret.io.file_hash(model_dir / "model.safetensors")
        assert (meta["arch"], meta["dim"], meta["pooling"], meta["max_length"]) == ("masked-mixer", 32, "last", 32)
        assert (meta["count"], meta["skipped_empty"], meta["field"]) == (len(pairs), 0, field)
        assert meta["truncation"] == "longer texts keep [bos] + the first 31 text tokens"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["document", "summary"]  # no temporary folders left
    assert sorted(p.name for p in (tmp_path / "document").iterdir()) == ["embeddings.safetensors", "ids.jsonl",
                                                                         "meta.json"]
    umask = os.umask(0)
    os.umask(umask)
    for p in [tmp_path / "document", *(tmp_path / "document").iterdir()]:  # ordinary permissions, not mkdtemp's
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask


def test_ids_fall_back_to_line_numbers_and_float16(model_dir, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "alpha"}\n\n{"text": "beta", "id": 7}\n{"text": "gamma", "id": null}\n')
    embed_corpus(model_dir, corpus, tmp_path / "e", dtype="float16", pooling="mean", max_length=8)
    E, ids, texts, meta = load_emb_dir(tmp_path / "e")
    assert ids == ["1", "7", "4"] and texts == ["alpha", "beta", "gamma"]
    assert E.dtype == np.float32 and meta["dtype"] == "float16" and meta["max_length"] == 8
    assert_close(E, encode(make(), texts, pooling="mean", max_length=8), rtol=1e-3)  # stored as float16


def test_parquet_txt_and_tinystories_corpora(model_dir, tmp_path):
    pq.write_table(pa.table({"key": ["p", "q"], "body": ["one", "two"]}), tmp_path / "c.parquet")
    embed_corpus(model_dir, tmp_path / "c.parquet", tmp_path / "pq", field="body", id_field="key")
    assert load_emb_dir(tmp_path / "pq")[1:3] == (["p", "q"], ["one", "two"])

    (tmp_path / "c.txt").write_text("first doc\n\nsecond doc\n")
    embed_corpus(model_dir, tmp_path / "c.txt", tmp_path / "txt")
    assert load_emb_dir(tmp_path / "txt")[1:3] == (["1", "2"], ["first doc", "second doc"])

    with pytest.warns(UserWarning):  # the fixture has records without a summary
        pairs = load_pairs(FIXTURES / "tinystories_instruct.txt")
    for field in ("summary", "document"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            embed_corpus(model_dir, FIXTURES / "tinystories_instruct.txt", tmp_path / f"ts-{field}", field=field)
        _, ids, texts, _ = load_emb_dir(tmp_path / f"ts-{field}")
        assert ids == [p.id for p in pairs]
        assert texts == [p.query if field == "summary" else p.target for p in pairs]
    with pytest.raises(MixretError, match="a .txt file has no field 'body'"):
        embed_corpus(model_dir, tmp_path / "c.txt", tmp_path / "x", field="body")


def test_hub_dataset_name(model_dir, tmp_path, monkeypatch):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["one", "", "three"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: ds)
    with pytest.warns(UserWarning, match="skipped 1 records with empty 'text'"):
        meta = embed_corpus(model_dir, "someone/corpus", tmp_path / "hub")
    assert load_emb_dir(tmp_path / "hub")[1:3] == (["1", "3"], ["one", "three"])
    assert meta["skipped_empty"] == 1

    def fail(name, split):
        raise FileNotFoundError("no such dataset")
    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(MixretError, match="someone/missing: not a local file.*no such dataset"):
        embed_corpus(model_dir, "someone/missing", tmp_path / "hub2")


def test_bad_corpora(model_dir, tmp_path):
    def err(content, match, name="c.jsonl", **kw):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(MixretError, match=match):
            embed_corpus(model_dir, path, tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists()

    err(b"", "c.jsonl: empty file")
    err(b'{"text": "a"}\n{"text": "b"\n', r"c.jsonl:2: invalid JSON")
    err(b'{"text": "a"}\n{"body": "b"}\n', r"c.jsonl:2: record has no text field 'text'")
    err(b'{"text": "a"}\n{"text": 5}\n', r"c.jsonl:2: field 'text' should be text")
    err(b'{"text": "a"}\n{"text": "\xff\xfe"}\n', r"c.jsonl:2: not valid UTF-8")
    err(b'{"text": ""}\n{"text": "  "}\n', r"no texts to embed in field 'text' \(2 empty\)")
    err(b'{"text": "a", "id": 1}\n{"text": "b", "id": "1"}\n', r"c.jsonl:2: id '1' repeats the id at .*c.jsonl:1")
    err(b"a\xffb\n", r"c.txt:1: not valid UTF-8", name="c.txt")
    with pytest.raises(MixretError, match="model directory not found"):
        embed_corpus(tmp_path / "nope", FIXTURES / "pairs.jsonl", tmp_path / "out")
    with pytest.raises(MixretError, match="file not found"):
        embed_corpus(model_dir, tmp_path / "missing.jsonl", tmp_path / "out")


def test_empty_texts_are_skipped_with_count(model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": ""}, {"text": None}, {"text": "d"}])
    with pytest.warns(UserWarning, match="skipped 2 records with empty 'text' text"):
        meta = embed_corpus(model_dir, corpus, tmp_path / "e")
    assert meta["skipped_empty"] == 2 and meta["count"] == 2
    assert load_emb_dir(tmp_path / "e")[1] == ["1", "4"]


def test_model_without_tokenizer(tmp_path):
    model = make()
    model.tokenizer = None
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(MixretError, match="no tokenizer"):
        embed_corpus(tmp_path / "m", FIXTURES / "pairs.jsonl", tmp_path / "e")


def test_interrupted_run_leaves_nothing_that_looks_complete(model_dir, tmp_path, monkeypatch):
    corpus = FIXTURES / "pairs.jsonl"
    out = tmp_path / "e"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(embed, "encode_texts", boom)
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(model_dir, corpus, out, field="summary")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    embed_corpus(model_dir, corpus, out, field="summary")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(embed, "write_emb_dir", lambda d, *a: ((d / "ids.jsonl").write_text("partial"), boom()))
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(model_dir, corpus, out, field="document", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old EMB_DIR is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_existing_out_dir(model_dir, tmp_path):
    corpus, out = FIXTURES / "pairs.jsonl", tmp_path / "e"
    embed_corpus(model_dir, corpus, out, field="summary")
    with pytest.raises(MixretError, match="already exists; pass --overwrite"):
        embed_corpus(model_dir, corpus, out, field="document")
    embed_corpus(model_dir, corpus, out, field="document", overwrite=True)
    assert load_emb_dir(out)[3]["field"] == "document"
    assert [p.name for p in tmp_path.iterdir()] == ["e"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(MixretError, match="not an embeddings folder"):
        embed_corpus(model_dir, corpus, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_load_emb_dir_validation(model_dir, tmp_path):
    out = tmp_path / "e"
    embed_corpus(model_dir, FIXTURES / "pairs.jsonl", out, field="summary")
    with pytest.raises(MixretError, match="embeddings folder not found"):
        load_emb_dir(tmp_path / "nope")
    lines = (out / "ids.jsonl").read_text().splitlines()
    (out / "ids.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(MixretError, match=r"3 embeddings but 2 lines in ids.jsonl"):
        load_emb_dir(out)
    (out / "ids.jsonl").write_text(lines[0] + "\nnot json\n" + lines[2] + "\n")
    with pytest.raises(MixretError, match=r"ids.jsonl:2: expected a JSON object"):
        load_emb_dir(out)
    (out / "embeddings.safetensors").unlink()
    with pytest.raises(MixretError, match="embeddings.safetensors: not found"):
        load_emb_dir(out)
    (out / "meta.json").unlink()
    with pytest.raises(MixretError, match="meta.json: embeddings meta file .*not found"):
        load_emb_dir(out)


# --- CLI --------------------------------------------------------------------------------------

def test_cli_embed(model_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "e"
    res = runner.invoke(main, ["embed", str(FIXTURES / "pairs.jsonl"), "--model", str(model_dir), "--field",
                               "document", "--out", str(out), "--batch-size", "2", "--pooling", "eos"])
    assert res.exit_code == 0, res.output
    assert "3 embeddings of dim 32" in res.output and "3 truncated" in res.output
    assert "warning: " in res.output and "3 of 3 texts were longer than 32 tokens" in res.output
    E, ids, _, meta = load_emb_dir(out)
    assert meta["pooling"] == "eos" and E.shape == (3, 32)

    res = runner.invoke(main, ["embed", str(FIXTURES / "pairs.jsonl"), "--model", str(model_dir), "--field",
                               "nope", "--out", str(tmp_path / "f")])
    assert res.exit_code == 1 and "pairs.jsonl:1: record has no text field 'nope'" in res.output
    assert "Traceback" not in res.output


def test_cli_default_model_and_out(model_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["embed", str(FIXTURES / "pairs.jsonl")])
    assert res.exit_code == 1 and "no model found" in res.output
    shutil.copytree(model_dir, tmp_path / "runs" / "tiny")
    res = runner.invoke(main, ["embed", str(FIXTURES / "pairs.jsonl"), "--field", "summary"])
    assert res.exit_code == 0, res.output
    assert load_emb_dir(tmp_path / "emb" / "tiny" / "pairs-summary")[3]["count"] == 3


# --- torchrun ---------------------------------------------------------------------------------

def test_torchrun_shards_match_single_process(model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"text number {i} " * (i % 4 + 1)}
                                                for i in range(11)])
    embed_corpus(model_dir, corpus, tmp_path / "single", batch_size=4)
    env = {**os.environ, "PYTHONPATH": str(Path(mixret.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "mixret.cli", "embed", str(corpus), "--model", str(model_dir), "--out", str(tmp_path / "multi"),
           "--batch-size", "4"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    E1, ids1, texts1, meta1 = load_emb_dir(tmp_path / "single")
    E2, ids2, texts2, meta2 = load_emb_dir(tmp_path / "multi")
    assert ids1 == ids2 and texts1 == texts2
    assert_close(E1, E2)
    assert meta1["truncated"] == meta2["truncated"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "multi", "single"]
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == ["embeddings.safetensors", "ids.jsonl",
                                                                      "meta.json"]


def test_torchrun_a_failing_rank_fails_every_rank_with_its_message(model_dir, tmp_path):
    """Rank 1 fails while embedding: rank 0 must not wait for it at a barrier but fail with its message."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"text {i}"} for i in range(6)])
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(
        "import os, sys\n"
        "from mixret import cli\n"
        "from mixret.retrieval import embeddings as embed\n"
        "from mixret.errors import MixretError\n"
        "real = embed.encode_texts\n"
        "def encode_texts(*args, **kwargs):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise MixretError('the GPU of rank 1 caught fire')\n"
        "    return real(*args, **kwargs)\n"
        "embed.encode_texts = encode_texts\n"
        "cli.main(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(Path(mixret.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "embed", str(corpus), "--model", str(model_dir), "--out", str(tmp_path / "multi")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    output = res.stdout + res.stderr
    assert output.count("Error: rank 1: the GPU of rank 1 caught fire") == 2, output  # both ranks say it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "fail_on_rank1.py"]  # nothing left behind
