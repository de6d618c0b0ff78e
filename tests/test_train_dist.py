"""`mixret pretrain` under torchrun: 2 CPU processes (gloo) train like one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from close import assert_close

import mixret
from mixret.training.pretrain import TrainConfig, pretrain

ROOT = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_corpus(path: Path, n: int = 200) -> Path:
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(n)) + "\n")
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


OPTIONS = dict(tokenizer="bytes", d_model=32, layers=2, context=40, steps=6, grad_accum=2, log_every=1,
               eval_every=3, lr=3e-3)


def test_torchrun_two_processes_match_one_process(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MIXRET_CACHE": str(tmp_path / "cache")}
    flags = [x for k, v in OPTIONS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    # 2 processes x 3 sequences x 2 micro-batches = a global batch of 12
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mixret.cli", "pretrain", "--data", str(corpus), *flags, "--batch-size", "3",
           "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("model written to") == 1  # rank 0 reports

    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))
    single = pretrain(TrainConfig(data=[str(corpus)], batch_size=6, out=str(tmp_path / "one"), **OPTIONS))
    ddp, one = metrics(tmp_path / "ddp"), metrics(single)
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == list(range(1, 7))
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert [r["val_loss"] for r in ddp if r["val_loss"]] == pytest.approx([r["val_loss"] for r in one if r["val_loss"]],
                                                                          rel=1e-4)
    assert one[-1]["loss"] < one[0]["loss"] - 0.5  # it learned something, so the comparison means something
    ids = torch.randint(0, 256, (2, 40))
    assert_close(mixret.load(tmp_path / "ddp")(ids).logits, mixret.load(single)(ids).logits, rtol=1e-4)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in single.iterdir())


def test_torchrun_spans_match_one_process(tmp_path, monkeypatch):
    """The span objective under DDP: the unused LM head is frozen (DDP refuses parameters without a gradient),
    and micro-batch j draws the spans it would draw in one process."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MIXRET_CACHE": str(tmp_path / "cache")}
    options = {**OPTIONS, "objective": "spans", "span_min": 4, "span_max": 8}
    flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mixret.cli", "pretrain", "--data", str(corpus), *flags, "--batch-size", "4",
           "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))
    single = pretrain(TrainConfig(data=[str(corpus)], batch_size=4, out=str(tmp_path / "one"),
                                  **{**options, "grad_accum": 4}))   # the same 16 documents a step
    ddp, one = metrics(tmp_path / "ddp"), metrics(single)
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert [r["val_r1"] for r in ddp] == [r["val_r1"] for r in one]
    assert one[-1]["loss"] < one[0]["loss"]
    ids = torch.randint(0, 256, (2, 40))
    assert_close(mixret.load(tmp_path / "ddp").hidden(ids), mixret.load(single).hidden(ids), rtol=1e-4)


def test_torchrun_finetune_matches_one_process(tmp_path, monkeypatch):
    """Contrastive fine-tuning under DDP (the LM head, which no embedding uses, is frozen): 2 processes of one
    micro-batch each make the updates of one process with 2 micro-batches."""
    from mixret.data import Pair, write_pairs_jsonl
    from mixret.models import ModelConfig
    from mixret.training.finetune import FinetuneConfig, finetune
    from mixret.training.loop import LoopConfig
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(120):
        words = list(rng.choice(WORDS, size=4, replace=False))
        pairs.append(Pair(f"p{i}", " ".join(words[:2]), " ".join(words + list(rng.choice(WORDS, size=4)))))
    path = tmp_path / "pairs.jsonl"
    write_pairs_jsonl(pairs, path)
    opts = dict(test_fraction=0.0, val_pairs=20, tokenizer="bytes", batch_size=8, token_dropout=0.0)
    model = dict(d_model=32, layers=2, context=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MIXRET_CACHE": str(tmp_path / "cache")}
    flags = [x for k, v in {**opts, **model}.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mixret.cli",
           "finetune", "--pairs", str(path), *flags, "--steps", "6", "--eval-every", "3", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))
    single = finetune(FinetuneConfig(
        pairs=str(path), **opts, out=str(tmp_path / "one"),
        model=ModelConfig(d_model=32, n_layers=2, context=40, mixing_init="mean"),
        loop=LoopConfig(steps=6, grad_accum=2, lr=1e-3, weight_decay=0.01, eval_every=3, progress=False)))
    ddp, one = metrics(tmp_path / "ddp"), metrics(single)
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [0, 3, 6]   # step 0: before training
    for key in ("loss", "val_r1", "val_mean_cos"):
        values = [[r[key] for r in run if r.get(key) is not None] for run in (ddp, one)]
        assert len(values[0]) >= 2 and values[0] == pytest.approx(values[1], rel=1e-4), key
    assert one[-1]["loss"] < one[0]["loss"]
    ids = torch.randint(0, 256, (2, 30))
    assert_close(mixret.load(tmp_path / "ddp").embed(ids), mixret.load(single).embed(ids), rtol=1e-4)


def test_torchrun_distill_matches_one_process(tmp_path, monkeypatch):
    """Distillation under DDP (with pairs): one process computes the teacher's embeddings, the other reads them
    from the cache; every trained parameter (the isometry included) gets a gradient; micro-batch j draws the pairs
    it would draw in one process."""
    pytest.importorskip("sentence_transformers")
    from st_models import tiny_st_model

    from mixret.data import Pair, write_pairs_jsonl
    corpus = write_corpus(tmp_path / "corpus.txt")
    teacher = tiny_st_model(tmp_path / "teacher", corpus.read_text().splitlines())
    rng = np.random.default_rng(0)
    pairs = [Pair(f"p{i}", " ".join(w[:2]), " ".join(w)) for i in range(60)
             for w in [list(rng.choice(WORDS, size=5, replace=False))]]
    write_pairs_jsonl(pairs, tmp_path / "pairs.jsonl")
    options = {**OPTIONS, "teacher": str(teacher), "pairs": str(tmp_path / "pairs.jsonl")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MIXRET_CACHE": str(tmp_path / "cache")}
    flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mixret.cli", "distill", "--texts", str(corpus), *flags, "--batch-size", "4",
           "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("teacher: embedding 200 texts") == 1
    assert len(list((tmp_path / "cache" / "teacher").glob("*.npy"))) == 1

    monkeypatch.setenv("MIXRET_CACHE", str(tmp_path / "cache"))
    single = pretrain(TrainConfig(objective="distill", data=[str(corpus)], batch_size=4, out=str(tmp_path / "one"),
                                  **{**options, "grad_accum": 4}))
    ddp, one = metrics(tmp_path / "ddp"), metrics(single)
    assert [r["step"] for r in ddp] == [r["step"] for r in one]
    for key in ("loss", "val_cos"):  # steps without an evaluation record val_cos as null
        values = [[r[key] for r in run if r.get(key) is not None] for run in (ddp, one)]
        assert len(values[0]) >= 2 and values[0] == pytest.approx(values[1], rel=1e-4), key
    assert one[-1]["loss"] < one[0]["loss"]
    ids = torch.randint(0, 256, (2, 40))
    assert_close(mixret.load(tmp_path / "ddp").hidden(ids), mixret.load(single).hidden(ids), rtol=1e-4)
