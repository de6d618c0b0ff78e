"""`mixret pretrain --objective spans`: a retriever from documents alone (a planted corpus it must learn), resume
equal to an uninterrupted run, spans drawn by (seed, step), the model folder finetune and encode read, bad
options."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from close import assert_close
from planted import planted_documents, planted_pairs
from safetensors.torch import load_file

import mixret
from mixret.cli import main
from mixret.data import write_pairs_jsonl
from mixret.distributed import Distributed
from mixret.errors import MixretError
from mixret.models.encode import encode
from mixret.training.pretrain import TrainConfig, make_task, pretrain
from mixret.training.spans import draw_span

N_TRAIN = 200  # of the 276 planted documents; the other 76 are never seen in training


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "docs.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(planted_documents()[:N_TRAIN]) + "\n", encoding="utf-8")
    return path


def tiny(tmp_path: Path, **kw) -> TrainConfig:
    opts = dict(data=[str(corpus(tmp_path))], objective="spans", tokenizer="bpe", vocab_size=300, d_model=64,
                layers=2, context=48, batch_size=16, steps=150, lr=3e-3, log_every=10, eval_every=50,
                out=str(tmp_path / "run"))
    return TrainConfig(**{**opts, **kw})


def span_r1(model, docs: list[str], words: int = 4, seed: int = 1) -> float:
    """R@1 of a random run of `words` words of each document, against all the documents."""
    rng = np.random.default_rng(seed)
    spans = []
    for doc in docs:
        w = doc.split()
        start = rng.integers(0, len(w) - words + 1)
        spans.append(" ".join(w[start:start + words]))
    q, d = encode(model, spans, normalize_embeddings=True), encode(model, docs, normalize_embeddings=True)
    return float(((q @ d.T).argmax(1) == np.arange(len(docs))).mean())


def test_spans_alone_retrieve_unseen_documents_from_their_spans(tmp_path):
    out = pretrain(tiny(tmp_path))
    model = mixret.load(out)
    assert model.embedding_defaults == {"pooling": "last", "max_length": 48}  # recorded: encode uses it untold
    assert model.config.mixing_init == "mean"                                  # the spans default
    held_out = planted_documents()[N_TRAIN:]
    assert len(held_out) == 76                                                 # chance R@1 0.013
    assert span_r1(model, held_out) > 0.3                                      # (0.49 when written)
    untrained = mixret.build_model(model.config)
    untrained.tokenizer, untrained.embedding_defaults = model.tokenizer, model.embedding_defaults
    assert span_r1(untrained, held_out) < 0.2                                  # learned, not given by the init
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["val_r1"] > 0.5 and recs[-1]["loss"] < recs[0]["loss"] - 1
    assert "spans_per_s" in recs[0]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["objective"] == "spans" and saved["batch_size"] == 16 and saved["temperature"] == 0.05


def test_stop_after_and_resume_equal_a_straight_run(tmp_path):
    # dropout makes the RNG state part of what a checkpoint must restore; grad_accum the optimizer's sums
    opts = dict(steps=8, dropout=0.1, grad_accum=2, batch_size=8, log_every=1, eval_every=4, checkpoint_every=3)
    straight = pretrain(tiny(tmp_path / "a", **opts))
    stopped = pretrain(tiny(tmp_path / "b", stop_after=5, **opts))
    run = tmp_path / "b" / "run"
    assert stopped == run / "checkpoints" / "step-000005" and not (run / "model.safetensors").exists()
    midway = load_file(str(stopped / "model.safetensors"))
    resumed = pretrain(tiny(tmp_path / "b", resume=True, **opts))
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], rtol=1e-5, name=k)
    assert not torch.allclose(a["wte.weight"], midway["wte.weight"], atol=1e-3)  # the last 3 steps count
    logs = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (straight, resumed)]
    assert [r["step"] for r in logs[1]] == list(range(1, 9))
    assert [r["loss"] for r in logs[1]] == pytest.approx([r["loss"] for r in logs[0]], rel=1e-5)


def test_spans_are_a_function_of_seed_and_step(tmp_path):
    cfg = tiny(tmp_path, batch_size=4, steps=3)
    cfg.validate()
    with Distributed.from_env() as dist:
        task = make_task(cfg, dist)
        first = [b for _, b in zip(range(3), task.batches(0, dist, 1))]
        again = next(task.batches(2, dist, 1))
    for x, y in zip(first[2][0], again[0]):
        assert torch.equal(x, y)
    spans, docs = first[0][0][0], first[0][0][2]
    assert not torch.equal(first[0][0][0], first[1][0][0])
    for span, s_mask, doc, d_mask in zip(spans, first[0][0][1], docs, first[0][0][3]):
        s, d = span[s_mask.bool()].tolist(), doc[d_mask.bool()].tolist()
        assert s[0] == d[0] == task.tokenizer.bos_id and 1 <= len(s) - 1 <= max(1, (len(d) - 1) // 2)
        assert any(d[i:i + len(s) - 1] == s[1:] for i in range(1, len(d)))  # a run of its document


def test_draw_span_lengths():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 30, 100):
        for _ in range(50):
            start, length = draw_span(n, 8, 24, rng)
            assert 1 <= length <= max(1, n // 2) and (n < 16 or length >= 8) and length <= 24
            assert 0 <= start <= n - length


def test_the_spans_folder_records_its_pooling_and_finetune_starts_from_it(tmp_path):
    out = pretrain(tiny(tmp_path, steps=2, pooling="mean"))
    model = mixret.load(out)
    assert model.embedding_defaults == {"pooling": "mean", "max_length": 48}
    texts = planted_documents()[:5]
    assert np.array_equal(encode(model, texts), encode(model, texts, pooling="mean"))
    assert not np.allclose(encode(model, texts), encode(model, texts, pooling="last"))
    pairs = tmp_path / "pairs.jsonl"
    write_pairs_jsonl(planted_pairs(), pairs)
    result = CliRunner().invoke(main, list(map(str, ["finetune", "--pairs", pairs, "--model", out, "--pooling", "mean",
                                       "--val-pairs", 32, "--batch-size", 16, "--steps", 2, "--out", tmp_path / "ft"])))
    assert result.exit_code == 0, result.output
    tuned = mixret.load(tmp_path / "ft")
    assert tuned.config == model.config and tuned.embedding_defaults["pooling"] == "mean"
    assert tuned.trained_on[0] == model.trained_on[0]                # the documents, then the pairs


def test_objective_options_are_checked():
    with pytest.raises(MixretError, match="unknown objective 'span'; expected one of clm, spans, distill"):
        TrainConfig(objective="span").validate()
    with pytest.raises(MixretError, match="option temperature applies to objective 'spans' or 'distill', not 'clm'"):
        TrainConfig(temperature=0.1).validate()
    with pytest.raises(MixretError, match="option label_smoothing applies to objective 'clm'"):
        TrainConfig(objective="spans", label_smoothing=0.1).validate()
    with pytest.raises(MixretError, match="option pack applies to objective 'clm'"):
        TrainConfig(objective="spans", pack=True).validate()
    with pytest.raises(MixretError, match="span_max must be an integer >= 8"):
        TrainConfig(objective="spans", span_max=4).validate()
    assert TrainConfig().model.mixing_init == "random" and TrainConfig().batch_size == 16
    spans = TrainConfig(objective="spans")
    assert (spans.model.mixing_init, spans.batch_size, spans.loop.lr, spans.tokenizer) == ("mean", 32, 1e-3, "bpe-lower")
    assert TrainConfig(objective="spans", mixing_init="random", batch_size=8).batch_size == 8


def test_cli_rejects_a_bad_objective_and_explains_them():
    result = CliRunner().invoke(main, ["pretrain", "--objective", "span"])
    assert result.exit_code == 2 and "'span' is not one of 'clm', 'spans'" in result.output
    result = CliRunner().invoke(main, ["pretrain", "--temperature", "0.1"])
    assert result.exit_code == 1 and "option temperature applies to objective 'spans'" in result.output
    help_text = " ".join(CliRunner().invoke(main, ["pretrain", "--help"], terminal_width=200).output.split())
    assert "clm: next-token prediction" in help_text and "spans: a retriever from documents alone" in help_text
    for flag, default in (("--objective", "clm"), ("--temperature", 0.05), ("--span-min", 8), ("--span-max", 24),
                          ("--pooling", "last")):
        assert f"{flag} " in help_text and f"[default: {default}]" in help_text


def test_default_data_is_the_bundled_training_split(tmp_path, capsys, monkeypatch):
    """As for clm: with no --data the spans come from the bundled pairs' training split only (its summaries and
    documents, every one of them, in order), and the model records it."""
    from mixret.data import BUNDLED_TEST_FRACTION, bundled_pairs_path, bundled_splits, file_hash
    from mixret.training import text_task
    read = []                                                  # the documents the objective tokenizes
    tokenize = text_task.tokenize_corpus
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text_task, "tokenize_corpus",
                        lambda texts, *args, **kw: (read.extend(texts["text"]), tokenize(texts, *args, **kw))[1])
    run = pretrain(TrainConfig(objective="spans", tokenizer="bytes", d_model=16, layers=1, context=32, batch_size=2,
                               steps=1, eval_every=1, val_max_docs=20, out=str(tmp_path / "run")))
    assert f"data: {2 * len(bundled_splits()[0]):,} documents from the bundled corpus's training split" in \
        capsys.readouterr().err
    assert read == [t for p in bundled_splits()[0] for t in (p.query, p.target)]
    assert mixret.load(run).trained_on == [{"source": str(bundled_pairs_path().resolve()),
                                            "hash": file_hash(bundled_pairs_path()), "split": "train",
                                            "test_fraction": BUNDLED_TEST_FRACTION}]


def test_finetune_keeps_the_embedding_of_a_spans_model_and_gives_a_clm_model_the_head(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    write_pairs_jsonl(planted_pairs(), pairs)
    heads = {}
    for objective in ("spans", "clm"):
        out = pretrain(tiny(tmp_path / objective, steps=2, **({} if objective == "spans" else {"objective": "clm"})))
        result = CliRunner().invoke(main, list(map(str, [
            "finetune", "--pairs", pairs, "--model", out, "--val-pairs", 32, "--batch-size", 16, "--steps", 2,
            "--out", tmp_path / f"ft-{objective}"])))
        assert result.exit_code == 0, result.output
        heads[objective] = mixret.load(tmp_path / f"ft-{objective}").pool_head is not None
    # the spans model's last position is already an embedding; the CLM model's predicts the next token
    assert heads == {"spans": False, "clm": True}


def test_a_run_continues_a_model_folder_with_another_objective(tmp_path):
    """--init: spans then clm gives a language model again (finetune gives it the head); clm then spans trains
    the embedding through the head. Each keeps the folder's size and tokenizer, whatever the size options say."""
    spans = pretrain(tiny(tmp_path / "a", steps=2))
    result = CliRunner().invoke(main, list(map(str, [
        "pretrain", "--objective", "clm", "--init", spans, "--data", corpus(tmp_path), "--d-model", 32, "--steps",
        2, "--batch-size", 8, "--out", tmp_path / "clm"])))
    assert result.exit_code == 0, result.output
    start, lm = mixret.load(spans), mixret.load(tmp_path / "clm")
    assert lm.config == start.config
    assert (tmp_path / "clm" / "tokenizer.json").read_text() == (spans / "tokenizer.json").read_text()
    assert lm.embedding_defaults == {} and lm.pool_head is None      # a language model: no pooling recorded
    assert len(lm.trained_on) == 2
    before, after = load_file(spans / "model.safetensors"), load_file(tmp_path / "clm" / "model.safetensors")
    assert before.keys() == after.keys() and not all(torch.equal(before[k], after[k]) for k in before)

    back = pretrain(tiny(tmp_path / "b", steps=2, init=str(tmp_path / "clm")))
    model = mixret.load(back)
    assert model.pool_head is not None and model.embedding_defaults["pooling"] == "last"
    assert len(model.trained_on) == 3


def test_spans_from_a_clm_model_retrieve_unseen_documents(tmp_path):
    clm = pretrain(tiny(tmp_path / "clm", objective="clm", steps=60, batch_size=16, eval_every=60))
    model = mixret.load(pretrain(tiny(tmp_path / "spans", init=str(clm))))
    assert model.pool_head is not None
    assert span_r1(model, planted_documents()[N_TRAIN:]) > 0.3       # chance 0.013
