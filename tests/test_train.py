"""`mixret pretrain`: resume equivalence, interruption, learning, caching, bad input, every arch."""
import json
import math
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from close import assert_close
from interrupt import sigterm_after
from safetensors.torch import load_file

import mixret
from mixret.cli import main
from mixret.data import bundled_pairs_path, load_texts
from mixret.errors import MixretError
from mixret.options import flat_options
from mixret.tokenizer import ByteTokenizer
from mixret.training import loop, text_task, train_data
from mixret.training import pretrain as train
from mixret.training.checkpoint import latest_checkpoint, list_checkpoints, optimizer_from_flat, optimizer_to_flat
from mixret.training.loop import LoopConfig, lr_factor
from mixret.training.pretrain import NextTokenLoss, TrainConfig, pretrain, resolve_options
from mixret.training.text_task import DEFAULT_STEPS
from mixret.training.train_data import Stream, document_sequences, micro_batches, packed_sequences

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a small package tool library for with and of data files network server client python "
         "debian system support module command line interface graphical user").split()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Tokenized corpora go to the test's own cache, not ~/.cache/mixret."""
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))


def write_corpus(path: Path, n: int = 120, seed: int = 0) -> Path:
    """A .txt corpus, one document a line, of random sentences."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 15))) for _ in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny(tmp_path: Path, **kw) -> TrainConfig:
    opts = dict(data=[str(write_corpus(tmp_path / "corpus.txt"))], tokenizer="bytes", d_model=32, layers=2,
                context=48, batch_size=4, steps=6, log_every=1, eval_every=3, lr=3e-3, out=str(tmp_path / "run"))
    opts.update(kw)
    return TrainConfig(**opts)


def weights(directory: Path) -> dict:
    return load_file(str(directory / "model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def invoke(*args):
    return CliRunner().invoke(main, ["pretrain", *map(str, args)])


# --- the Python API and the output directory ----------------------------------------------------

def test_run_writes_a_loadable_model_and_its_records(tmp_path):
    out = pretrain(tiny(tmp_path))
    assert out == tmp_path / "run"
    model = mixret.load(out)
    assert model.config.arch == "masked-mixer" and model.config.context == 48
    assert isinstance(model.tokenizer, ByteTokenizer)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["steps"] == 6 and saved["d_model"] == 32 and "resume" not in saved
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "val_loss", "lr", "tokens_per_s", "peak_mem_mb"} <= set(r) for r in recs)
    assert [r["val_loss"] is not None for r in recs] == [False, False, True, False, False, True]
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in list_checkpoints(out)] == ["step-000006"]
    # the final model is the checkpoint's model
    assert all(torch.equal(weights(out)[k], v) for k, v in weights(latest_checkpoint(out)).items())


def test_stop_after_and_resume_equal_a_straight_run(tmp_path):
    # dropout makes the RNG state part of what a checkpoint must restore; grad_accum the optimizer's sums
    opts = dict(steps=8, dropout=0.1, grad_accum=2, eval_every=4, checkpoint_every=3)
    straight = pretrain(tiny(tmp_path / "a", **opts))
    stopped = pretrain(tiny(tmp_path / "b", stop_after=4, **opts))
    run = tmp_path / "b" / "run"
    assert stopped == run / "checkpoints" / "step-000004"
    assert not (run / "model.safetensors").exists()  # no final model until the schedule is complete
    assert mixret.load(stopped).config.d_model == 32  # but the checkpoint loads
    resumed = pretrain(tiny(tmp_path / "b", resume=True, **opts))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=1e-6)
    assert [r["step"] for r in metrics(resumed)] == list(range(1, 9))
    assert [r["loss"] for r in metrics(straight)] == pytest.approx([r["loss"] for r in metrics(resumed)], rel=1e-6)
    assert [p.name for p in list_checkpoints(resumed)] == ["step-000006", "step-000008"]  # the last 2 kept


def test_grad_accum_and_batch_split_give_the_same_update(tmp_path):
    """The step's loss is normalised by the tokens of the whole step, so 2 x 4 sequences == 1 x 8.

    Compared by the models' outputs: the mixing biases only shift each position by a constant that the next
    LayerNorm removes, so their gradients are rounding noise that Adam scales up, and differ between runs.
    """
    one = mixret.load(pretrain(tiny(tmp_path / "a", batch_size=8, steps=3)))
    two = mixret.load(pretrain(tiny(tmp_path / "b", batch_size=4, grad_accum=2, steps=3)))
    assert [r["loss"] for r in metrics(tmp_path / "a" / "run")] == \
        pytest.approx([r["loss"] for r in metrics(tmp_path / "b" / "run")], rel=1e-5)
    ids = torch.randint(0, 256, (3, 48))
    assert_close(one(ids).logits, two(ids).logits, rtol=1e-4)
    untrained = mixret.build_model(one.config)
    assert not torch.allclose(one(ids).logits, untrained(ids).logits, atol=1e-2)


def test_sigterm_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n=300)
    run = tmp_path / "run"
    args = ["--data", corpus, "--tokenizer", "bytes", "--d-model", "32", "--layers", "2", "--context", "48",
            "--batch-size", "4", "--steps", "100000", "--log-every", "1", "--eval-every", "100000",
            "--out", run]
    returncode, err = sigterm_after([sys.executable, "-m", "mixret.cli", "pretrain", *map(str, args)], run, lines=3)
    assert returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    last = latest_checkpoint(run)
    step = int(last.name.split("-")[1])
    assert step >= 3 and mixret.load(last).config.d_model == 32
    result = invoke("--out", run, "--resume", "--steps", step + 4)
    assert result.exit_code == 0, result.output
    assert f"model written to {run}" in result.output
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 5))
    assert mixret.load(run).config.d_model == 32


def test_validation_loss_falls_below_a_unigram_model(tmp_path):
    """Bundled corpus (real text), a tiny model and a short CPU run: the model must use context."""
    cfg = TrainConfig(tokenizer="bytes", d_model=64, layers=2, context=128, batch_size=16, steps=200,
                      lr=5e-3, eval_every=200, log_every=50, val_max_docs=300, out=str(tmp_path / "run"))
    out = pretrain(cfg)
    val_loss = metrics(out)[-1]["val_loss"]
    # the unigram model, computed here from the training split's bytes (the trainer's split, by its seed)
    texts = load_texts([bundled_pairs_path()], ["summary", "document"])["text"]
    train_idx, val_idx = train_data.split_documents(len(texts), 0.05, 300, seed=0)
    counts = np.ones(259)
    for i in train_idx:
        ids = (list(texts[i].encode()) + [258])[:127]
        np.add.at(counts, ids, 1)
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([(list(texts[i].encode()) + [258])[:127] for i in val_idx])
    unigram = float(-logp[targets].mean())
    assert 2.5 < unigram < 4.0
    assert val_loss < unigram - 0.5, (val_loss, unigram)


# --- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    {"arch": "masked-mixer", "mixer_expand": True},
    {"arch": "masked-mixer", "mixer_heads": 4, "tie_embeddings": True},
    {"arch": "masked-mixer", "mixer_kernel": 3},
    {"arch": "hypermixer", "hyper_dim": 8, "hyper_heads": 2},
    {"arch": "llama", "n_heads": 2},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_arch_trains_through_the_command(tmp_path, opts):
    """Each document is one random letter c repeated with dots between, "c.c.c...c": after a dot the next token
    is the document's letter, which only mixing tokens can tell. A model that sees each token alone (its token
    mixing zeroed) cannot do better than ln 26 on the 31 letters of each document's 62 targets, a loss of 1.63
    (measured: 1.7 for the expanded mixer); every arch must learn to mix and reach half of that on validation
    documents, starting near ln 260 = 5.6."""
    rng = np.random.default_rng(0)
    letters = rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=200)
    (tmp_path / "corpus.txt").write_text("".join(".".join(c * 31) + "\n" for c in letters))
    flags = [x for k, v in opts.items() if k != "arch"
             for x in ([f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", v])]
    result = invoke("--data", tmp_path / "corpus.txt", "--tokenizer", "bytes", "--arch", opts["arch"], *flags,
                    "--d-model", 32, "--layers", 2, "--context", 64, "--steps", 60, "--batch-size", 16, "--lr", 1e-2,
                    "--log-every", 1, "--eval-every", 60, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    model = mixret.load(tmp_path / "run")
    assert {k: getattr(model.config, k) for k in opts} == opts
    recs = metrics(tmp_path / "run")
    no_mixing = 31 / 62 * math.log(26)
    val_loss = [r["val_loss"] for r in recs if r.get("val_loss") is not None][-1]
    assert recs[0]["loss"] > 4.5 and val_loss < 0.5 * no_mixing, (recs[0]["loss"], val_loss)


def test_bpe_tokenizer_is_trained_saved_and_reused_on_resume(tmp_path):
    run = tmp_path / "run"
    pretrain(tiny(tmp_path, tokenizer="bpe", vocab_size=300, steps=4, stop_after=2))
    tok = (run / "tokenizer.json").read_text()
    assert json.loads(tok)["model"]["type"] == "BPE"
    out = pretrain(tiny(tmp_path, tokenizer="bpe", vocab_size=300, steps=4, resume=True))
    assert (out / "tokenizer.json").read_text() == tok
    model = mixret.load(out)
    assert model.config.vocab_size == model.tokenizer.vocab_size <= 300
    # --tokenizer PATH reuses a tokenizer.json
    reuse = pretrain(tiny(tmp_path, tokenizer=str(run / "tokenizer.json"), steps=1, out=str(tmp_path / "b")))
    assert (reuse / "tokenizer.json").read_text() == tok


def test_tokenization_is_cached_on_disk(tmp_path, monkeypatch):
    calls = []
    original = train_data.encode_documents

    def counting(texts, tokenizer):
        calls.append(len(texts))
        return original(texts, tokenizer)

    monkeypatch.setattr(train_data, "encode_documents", counting)
    pretrain(tiny(tmp_path, steps=1, out=str(tmp_path / "a")))
    assert sum(calls) == 120
    assert list((tmp_path / "cache" / "tokens").glob("*.arrow"))
    pretrain(tiny(tmp_path, steps=1, out=str(tmp_path / "b"), seed=1))  # same corpus and tokenizer
    assert sum(calls) == 120
    other = write_corpus(tmp_path / "other.txt", seed=5)  # another corpus: tokenized
    pretrain(tiny(tmp_path, steps=1, out=str(tmp_path / "c"), data=[str(other)]))
    assert sum(calls) == 240


def test_config_file_cli_flags_and_resume_layering(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    (tmp_path / "opts.json").write_text(json.dumps({
        "data": [str(corpus)], "tokenizer": "bytes", "d-model": 48, "layers": 2, "context": 32,
        "batch_size": 4, "steps": 6, "lr": 1e-3}))
    run = tmp_path / "run"
    result = invoke("--config", tmp_path / "opts.json", "--d-model", 32, "--out", run, "--stop-after", 2)
    assert result.exit_code == 0, result.output
    assert "checkpoint written to" in result.output and "--resume" in result.output
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["d_model"] == 32 and saved["lr"] == 1e-3 and saved["warmup"] == 1 and "stop_after" not in saved
    # --resume takes the saved options; only what is given changes
    cfg = resolve_options({"out": str(run), "resume": True, "steps": 8})
    assert (cfg.model.d_model, cfg.loop.lr, cfg.loop.steps, cfg.model.context) == (32, 1e-3, 8, 32)
    result = invoke("--out", run, "--resume", "--steps", 8)
    assert result.exit_code == 0, result.output
    assert mixret.load(run).config.d_model == 32 and metrics(run)[-1]["step"] == 8


def test_resume_with_a_longer_schedule_and_another_lr(tmp_path):
    pretrain(tiny(tmp_path, steps=6, stop_after=3, warmup=2))
    out = pretrain(tiny(tmp_path, steps=10, lr=1e-3, warmup=2, resume=True))
    lrs = {r["step"]: r["lr"] for r in metrics(out)}
    assert lrs[3] == pytest.approx(3e-3 * lr_factor(2, 2, 6))  # before: the first schedule
    for step in range(4, 11):  # after: the new peak lr and length, from where the run was
        assert lrs[step] == pytest.approx(1e-3 * lr_factor(step - 1, 2, 10))
    assert json.loads((out / "train_config.json").read_text())["steps"] == 10


def test_epochs_set_the_schedule_length(tmp_path):
    out = pretrain(tiny(tmp_path, steps=None, epochs=0.5, batch_size=6))
    # 120 documents, 6 for validation: 114 training sequences; half an epoch of batches of 6 is 10 steps
    assert json.loads((out / "train_config.json").read_text())["steps"] == 10
    assert metrics(out)[-1]["step"] == 10


def test_pack_makes_full_context_rows(tmp_path):
    out = pretrain(tiny(tmp_path, pack=True, steps=3, label_smoothing=0.1))
    assert metrics(out)[-1]["step"] == 3
    values = np.arange(10, dtype=np.int32)
    seqs = packed_sequences(values, np.array([0, 3, 7, 10]), np.array([0, 2]), context=4)
    assert [seqs.tokens[s:e].tolist() for s, e in zip(seqs.starts, seqs.ends)] == [[0, 1, 2, 7], [8, 9]]


# --- bad input: a clear error, nothing written ----------------------------------------------------

def test_missing_file(tmp_path):
    result = invoke("--data", tmp_path / "nope.txt", "--out", tmp_path / "run")
    assert result.exit_code == 1 and "nope.txt: file not found" in result.output
    assert not (tmp_path / "run").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    result = invoke("--data", tmp_path / "empty.jsonl", "--out", tmp_path / "run")
    assert result.exit_code == 1 and "empty.jsonl" in result.output
    assert not (tmp_path / "run").exists()


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
    result = invoke("--data", path, "--out", tmp_path / "run")
    assert result.exit_code == 1 and f"{path}:3" in result.output and "invalid JSON" in result.output
    assert not (tmp_path / "run").exists()


def test_missing_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "one"}\n')
    result = invoke("--data", path, "--text-field", "text", "--out", tmp_path / "run")
    assert result.exit_code == 1 and "'text'" in result.output and "body" in result.output
    assert not (tmp_path / "run").exists()


def test_context_larger_than_the_arch_supports(tmp_path):
    result = invoke("--context", 100_000, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "context 100000" in result.output and "masked-mixer" in result.output
    assert not (tmp_path / "run").exists()


def test_conflicting_options(tmp_path):
    result = invoke("--steps", 10, "--epochs", 1, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "either steps or epochs" in result.output
    with pytest.raises(MixretError, match="unknown option"):
        resolve_options({"d_modle": 3})
    assert not (tmp_path / "run").exists()


def test_output_directory_holding_another_model(tmp_path):
    out = pretrain(tiny(tmp_path, steps=2))
    before = weights(out)
    for extra, match in ((dict(d_model=64), "holds a different model"), ({}, "already holds")):
        with pytest.raises(MixretError, match=match):
            pretrain(tiny(tmp_path, steps=2, **extra))
    with pytest.raises(MixretError, match=r"d_model 32 there, 64 here"):
        pretrain(tiny(tmp_path, steps=4, d_model=64, resume=True))
    assert all(torch.equal(weights(out)[k], v) for k, v in before.items())  # untouched
    out = pretrain(tiny(tmp_path, steps=2, d_model=64, overwrite=True))
    assert mixret.load(out).config.d_model == 64 and len(list_checkpoints(out)) == 1
    # a model directory not made by the trainer is refused too
    (tmp_path / "other").mkdir()
    mixret.load(out).save_pretrained(tmp_path / "other")
    result = invoke("--out", tmp_path / "other", "--data", tmp_path / "corpus.txt", "--tokenizer", "bytes")
    assert result.exit_code == 1 and "already holds a different model" in result.output


def test_resume_refuses_a_changed_corpus(tmp_path):
    corpus = write_corpus(tmp_path / "data" / "corpus.txt")
    pretrain(tiny(tmp_path, data=[str(corpus)], stop_after=2))
    write_corpus(corpus, seed=3)
    with pytest.raises(MixretError, match="corpus has changed"):
        pretrain(tiny(tmp_path, data=[str(corpus)], resume=True))


# --- pieces ---------------------------------------------------------------------------------------

def test_batches_are_right_padded_to_their_longest_member():
    seqs = document_sequences(np.arange(20, dtype=np.int32), np.array([0, 3, 10, 20]), np.array([0, 1, 2]), 8)
    assert seqs.lengths(np.arange(3)).tolist() == [3, 7, 8]  # the last document is truncated to the context
    batch = seqs.batch(np.array([0, 1]), pad_id=99)
    assert batch.input_ids.tolist() == [[0, 1, 2, 99, 99, 99, 99], [3, 4, 5, 6, 7, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]
    # positions that predict a real token: (row 0, t 0..1), (row 1, t 0..5), flattened as b * L + t
    assert batch.positions.tolist() == [0, 1, 7, 8, 9, 10, 11, 12]
    assert batch.targets.tolist() == [1, 2, 4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("arch", ["masked-mixer", "hypermixer", "llama"])
def test_loss_ignores_padding(arch):
    model = mixret.build_model(mixret.ModelConfig(arch=arch, vocab_size=30, d_model=16, n_layers=2, context=12))
    objective = NextTokenLoss(model)
    seqs = document_sequences(torch.randint(3, 30, (20,), dtype=torch.int32).numpy(), np.array([0, 4, 14, 20]),
                              np.arange(3), 12)
    padded = seqs.batch(np.arange(3), pad_id=0)
    together = objective(padded.input_ids, padded.positions, padded.targets)
    alone = [seqs.batch(np.array([i]), pad_id=0) for i in range(3)]
    torch.testing.assert_close(together, sum(objective(b.input_ids, b.positions, b.targets) for b in alone))
    # the same number as the cross-entropy of the model's logits over the non-pad targets, computed directly
    logits = model(padded.input_ids).logits
    labels = padded.input_ids[:, 1:].masked_fill(padded.attention_mask[:, 1:] == 0, -100)
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(together, reference)
    # and what sits in the padding does not matter
    changed = padded.input_ids.clone()
    changed[padded.attention_mask == 0] = 7
    torch.testing.assert_close(objective(changed, padded.positions, padded.targets), together)


def test_stream_and_micro_batches():
    stream = Stream(5, seed=0)
    first = stream.take(0, 12)
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    assert np.array_equal(Stream(5, seed=0).take(3, 6), first[3:9])  # any position, in any order of calls
    assert not np.array_equal(Stream(5, seed=1).take(0, 10), first[:10])
    idx = np.arange(16)
    ranks = [micro_batches(idx, 2, 4, 2, r) for r in range(2)]
    single = micro_batches(idx, 4, 4, 1, 0)
    for k in range(4):  # micro-step k of the ranks together is micro-step k of one process with their batch
        assert sorted(np.concatenate([ranks[0][k], ranks[1][k]])) == sorted(single[k])


def test_lr_schedule():
    assert lr_factor(0, 10, 100) == pytest.approx(1 / 11)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100) == pytest.approx(LoopConfig.min_lr_ratio)


def test_optimizer_state_round_trips_without_pickle():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, rest = optimizer_to_flat(opt)
    json.dumps(rest)  # everything but tensors is JSON
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(optimizer_from_flat(tensors, json.loads(json.dumps(rest))))
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("opts", [{}, {"mixer_heads": 2, "tie_embeddings": True}, {"arch": "llama"},
                                  {"arch": "hypermixer"}], ids=["flat", "heads-tied", "llama", "hypermixer"])
def test_weight_decay_by_role(opts):
    """Weights of Linear layers and mixing matrices decay; biases (the mixing bias, 2-D, included), norms and
    embeddings (a tied LM head, which is the embedding, included) do not."""
    model = mixret.build_model(mixret.ModelConfig(**{"vocab_size": 50, "d_model": 8, "n_layers": 1, "context": 8,
                                                     **opts}))
    opt = loop.make_optimizer(model, LoopConfig(weight_decay=0.1), torch.device("cpu"))
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == loop.decay_parameter_names(model)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_embedding = name.startswith("wte.") or ".pos." in name
        expected = leaf == "weight" and p.dim() == 2 and not is_embedding and ".ln" not in name \
            and not name.startswith("norm.") or name.endswith("mats.weight")
        assert (name in decayed) == expected, name
    if opts.get("arch", "masked-mixer") == "masked-mixer":
        assert "blocks.0.mix.mats.weight" in decayed and "blocks.0.mix.mats.bias" not in decayed
        assert model.blocks[0].mix.mats.bias.dim() == 2  # 2-D, yet a bias: no decay
    assert "wte.weight" not in decayed and all(n.startswith("blocks.") or n == "lm_head.weight" for n in decayed)
    assert ("lm_head.weight" in decayed) == (not opts.get("tie_embeddings", False))


def test_sample_hook_is_called_at_each_evaluation(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train, "sample_hook", lambda model, tok: seen.append(model.training) or "sample!")
    pretrain(tiny(tmp_path, steps=6, eval_every=3))
    assert seen == [False, False]


def test_cli_help_shows_the_real_defaults():
    result = CliRunner().invoke(main, ["pretrain", "--help"], terminal_width=200)
    defaults = TrainConfig()
    for flag, name in (("--d-model", "d_model"), ("--layers", "layers"), ("--context", "context"),
                       ("--batch-size", "batch_size"), ("--lr", "lr"), ("--vocab-size", "vocab_size"),
                       ("--eval-every", "eval_every"), ("--checkpoint-every", "checkpoint_every"),
                       ("--val-fraction", "val_fraction"), ("--log-every", "log_every")):
        line = next(line for line in result.output.splitlines() if line.strip().startswith(flag))
        assert f"[default: {flat_options(defaults)[name]}]" in line, line
    assert f"[default: {DEFAULT_STEPS}]" in next(l for l in result.output.splitlines() if "--steps" in l)


@pytest.mark.slow
def test_default_run_with_no_options(tmp_path, monkeypatch):
    """`mixret pretrain` alone: the default masked mixer on the bundled corpus (a few minutes on a CPU)."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["pretrain"])
    assert result.exit_code == 0, result.output
    out = Path(result.stdout.strip().removeprefix("model written to "))
    assert out.parent == Path("runs") and out.name.startswith("masked-mixer-")
    model = mixret.load(out)
    assert model.config.arch == "masked-mixer" and model.tokenizer.kind == "bpe"
    recs = metrics(out)
    assert recs[-1]["step"] == DEFAULT_STEPS
    assert recs[-1]["val_loss"] < 5.6  # a unigram model scores 6.8 on this split


def test_each_evaluation_prints_a_sample(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    result = invoke("--data", corpus, "--tokenizer", "bytes", "--d-model", 32, "--layers", 2, "--context", 48,
                    "--batch-size", 4, "--steps", 6, "--eval-every", 3, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    samples = [line for line in result.output.splitlines() if line.startswith("sample: ")]
    assert len(samples) == 2  # evaluations at steps 3 and 6
    assert all(len(s) > len("sample: ") for s in samples)


def test_default_data_is_the_bundled_training_split(tmp_path, monkeypatch):
    """With no --data, pretraining reads the bundled pairs' training split (split_pairs, as every command splits
    them), every text of it and none of the test split's, and records it, so that evaluating on the test split
    measures text the model never saw."""
    from mixret.data import BUNDLED_TEST_FRACTION, file_hash, load_pairs, split_pairs
    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))
    read = []                                                  # the documents pretraining tokenizes
    tokenize = text_task.tokenize_corpus
    monkeypatch.setattr(text_task, "tokenize_corpus",
                        lambda texts, *args, **kw: (read.extend(texts["text"]), tokenize(texts, *args, **kw))[1])
    run = pretrain(TrainConfig(tokenizer="bytes", d_model=16, layers=1, context=32, batch_size=2, steps=1,
                               eval_every=1, val_max_docs=20, out=str(tmp_path / "run")))
    train_pairs, test_pairs = split_pairs(load_pairs(bundled_pairs_path()), BUNDLED_TEST_FRACTION)
    assert read == [t for p in train_pairs for t in (p.query, p.target)]
    unseen = {t for p in test_pairs for t in (p.query, p.target)} - set(read)
    assert len(test_pairs) > 500 and len(unseen) > 2 * 500     # the test split's own texts, none of them read
    assert mixret.load(run).trained_on == [{"source": str(bundled_pairs_path().resolve()),
                                            "hash": file_hash(bundled_pairs_path()), "split": "train",
                                            "test_fraction": BUNDLED_TEST_FRACTION}]
