"""The baseline a user would pick instead: a sentence-transformers model fine-tuned on the same pairs.

    from mixret.training.baseline import BaselineConfig, train_baseline
    facts = train_baseline(BaselineConfig(model="all-MiniLM-L6-v2", pairs="train.jsonl.gz", out="runs/st",
                                          minutes=10, threads=1))

`mixret quickstart --baseline NAME_OR_PATH` runs it after the mixret models, with the wall-clock minutes and the
threads each of them had. The pairs are split as `finetune` splits them (distinct pairs, then the validation
slice chosen by a hash of the id), so the baseline trains on exactly the pairs the mixret models trained on and
its fusion weight is fitted on the same validation slice with the same fitted BM25. Training is what
sentence-transformers documents for pairs: MultipleNegativesRankingLoss (in-batch negatives, scale 20) with
AdamW at lr 2e-5 after a short linear warmup, batches of `batch_size` pairs drawn by (seed, epoch), until the
minutes are spent. `STEncoder` gives the fine-tuned model the `encode` that mixret.retrieval.evaluate calls.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mixret.data import load_pairs
from mixret.errors import MixretError
from mixret.training.distill import load_teacher
from mixret.training.finetune import distinct_pairs, fit_fusion, rank_metrics, validation_slice

BASELINE_LR = 2e-5        # sentence-transformers' default learning rate for fine-tuning
BASELINE_WARMUP = 10      # linear warmup steps (the length is set by the clock, so the warmup is in steps)
EVAL_BATCH = 64


@dataclass
class BaselineConfig:
    model: str                        # a sentence-transformers model name or folder
    pairs: str                        # training pairs (finetune's split: distinct pairs, then the validation slice)
    out: str                          # the fine-tuned model's folder
    minutes: float                    # wall-clock training time
    threads: int                      # torch threads while training
    batch_size: int = 32
    val_pairs: int = 500              # as finetune's default: the validation slice (at most a fifth of the pairs)
    query_field: str = "summary"
    target_field: str = "document"
    seed: int = 0


class STEncoder:
    """A SentenceTransformer with the `encode` mixret.retrieval.evaluate calls (pooling and max_length are the
    model's own)."""

    def __init__(self, model):
        self.model = model
        self.embedding_defaults = {"pooling": "sentence-transformers"}

    def encode(self, texts, batch_size: int = EVAL_BATCH, pooling=None, max_length=None) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                            normalize_embeddings=True, show_progress_bar=False), dtype=np.float32)

    @classmethod
    def load(cls, directory: str) -> "STEncoder":
        return cls(load_teacher(directory, "cuda" if torch.cuda.is_available() else "cpu").model)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def split(cfg: BaselineConfig) -> tuple[list, list]:
    """(training pairs, validation slice) exactly as mixret.training.finetune splits the same file with test_fraction
    0."""
    pairs, _ = distinct_pairs(load_pairs(cfg.pairs, cfg.query_field, cfg.target_field))
    return validation_slice(pairs, min(cfg.val_pairs, len(pairs) // 5))


def train_baseline(cfg: BaselineConfig, bm25_params, echo: Callable[[str], None] = print) -> dict:
    """Fine-tune cfg.model on the training pairs for cfg.minutes on cfg.threads threads, save it to cfg.out, fit
    the fusion weight on the validation slice with `bm25_params` -> facts for the quickstart report (with the
    Fusion under "fusion_object")."""

    train, val = split(cfg)
    if len(train) < cfg.batch_size:
        raise MixretError(f"{cfg.pairs}: {len(train)} training pairs cannot fill one batch of {cfg.batch_size}")
    model = load_teacher(cfg.model, "cuda" if torch.cuda.is_available() else "cpu").model
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        steps, seconds = fine_tune(model, train, cfg)
    finally:
        torch.set_num_threads(threads)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    model.save(str(cfg.out))
    encoder = STEncoder(model)
    q = encoder.encode([p.query for p in val])
    d = encoder.encode([p.target for p in val])
    val_r1 = rank_metrics(torch.from_numpy(q), torch.from_numpy(d))["val_r1"]
    fusion, fused_r1 = fit_fusion(q, d, val, bm25_params, "convex", cfg.pairs)
    echo(f"   baseline {cfg.model}: {seconds:.0f} s of fine-tuning ({steps} steps of {cfg.batch_size} pairs, "
         f"MultipleNegativesRankingLoss) -> {cfg.out}")
    return {"dir": str(cfg.out), "baseline": cfg.model, "train_minutes": cfg.minutes, "threads": cfg.threads,
            "finetune_seconds": seconds, "finetune_steps": steps, "val_r1": val_r1, "val_fusion_r1": fused_r1,
            "fusion_object": fusion}


def fine_tune(model, train: list, cfg: BaselineConfig) -> tuple[int, float]:
    """MultipleNegativesRankingLoss on batches of distinct training pairs until cfg.minutes have passed ->
    (steps, seconds)."""
    # deferred: sentence-transformers is the optional extra "st"
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    loss_fn = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASELINE_LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (BASELINE_WARMUP + 1)))
    tokenize = getattr(model, "preprocess", None) or model.tokenize     # `preprocess` from sentence-transformers 6
    per_epoch = len(train) // cfg.batch_size
    model.train()
    torch.manual_seed(cfg.seed)
    start, step, order = time.perf_counter(), 0, None
    while time.perf_counter() - start < 60 * cfg.minutes:
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        batch = [train[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
        features = [{k: v.to(model.device) if torch.is_tensor(v) else v for k, v in tokenize(texts).items()}
                    for texts in ([p.query for p in batch], [p.target for p in batch])]
        loss = loss_fn(features, labels=None)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    model.eval()
    return step, time.perf_counter() - start
