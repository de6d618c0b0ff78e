"""Pretraining: any architecture of the model zoo trained on texts alone, run by the shared loop.

    from mixret.training.pretrain import TrainConfig, pretrain
    out_dir = pretrain(TrainConfig(data=["corpus.jsonl"], steps=2000))   # mixret.load(out_dir) reads the model

`TrainConfig` holds the run's options and a `ModelConfig`; model options are also accepted by their flat
names (d_model=..., layers=...), as the command line and train_config.json give them. `TextTask` is what every
text-only objective gives `mixret.training.loop`: the corpus, tokenizer and model, the documents of each step, the run
folder and the saved model; its subclasses add an objective: `PretrainTask` next-token prediction (objective
"clm", the default), `mixret.training.spans.SpanTask` spans of each document as queries against the batch's documents
(objective "spans"), `mixret.training.distill.DistillTask` a sentence-transformers teacher's embedding of each text
(objective "distill", the command `mixret distill`).

Each document is one training sequence, [bos] + tokens + [eos], truncated to the context (a truncated document
has no eos); with `pack` the documents are concatenated and cut into full-context rows instead. Batches are
right-padded to their longest member. The next-token loss of an optimizer step is the sum of the cross-entropy of
every predicted token of the step (every micro-batch, every rank) divided by their number.

The order of the training sequences is a function of the seed and the step alone (an endless stream of
seeded permutations, one per epoch), so a run resumed from a checkpoint sees the same batches as a run that
never stopped.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mixret.distributed import Distributed
from mixret.models.generate import sample_text
from mixret.training import loop
from mixret.training.distill import DistillTask
from mixret.training.loop import Interrupted
from mixret.training.spans import SpanTask
from mixret.training.text_task import TextTask, TrainConfig, _normalize_data, _normalize_path, resolve_options
from mixret.training.train_data import (
    unigram_loss,
)

__all__ = ["Interrupted", "NextTokenLoss", "PretrainTask", "TextTask", "TrainConfig", "pretrain", "resolve_options"]



def sample_line(model, tokenizer) -> str:
    """A short seeded sample from the model being trained, on one line."""
    text = " ".join(sample_text(model, tokenizer, max_new_tokens=32).split())
    return f"sample: {text[:200]}"


sample_hook: Callable | None = sample_line
"""Called as sample_hook(model, tokenizer) at each evaluation on rank 0, with the model in eval mode;
a returned string is printed under the evaluation line. Set to None for no samples."""


# --- options ----------------------------------------------------------------------------------















# --- the objective ----------------------------------------------------------------------------

class NextTokenLoss(torch.nn.Module):
    """The training objective around a causal LM: a batch's summed next-token cross-entropy.

    The LM head runs only at the positions that predict a real token, so padding costs no head compute.
    Called with a Batch it returns (summed loss, number of predicted tokens), as the loop expects.
    """

    def __init__(self, model: torch.nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, input_ids, positions: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                label_smoothing: float | None = None):
        if positions is None:  # a Batch: the loop's call
            batch = input_ids
            loss = self.summed(batch.input_ids, batch.positions, batch.targets, self.label_smoothing)
            return loss, batch.positions.numel()
        return self.summed(input_ids, positions, targets, label_smoothing or 0.0)

    def summed(self, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
               label_smoothing: float) -> torch.Tensor:
        h = self.model.hidden(input_ids).flatten(0, 1)                # [B*L, D]
        logits = self.model.lm_head(h.index_select(0, positions))     # [N, V]
        return F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing)


# --- the task -------------------------------------------------------------------------------------

def pretrain(cfg: TrainConfig) -> Path:
    """Train a model as `cfg` says (next-token prediction, or spans as queries with cfg.objective "spans");
    returns a directory mixret.load reads: the output directory when the schedule is complete, or the
    checkpoint written when `stop_after` ended the run early.

    Raises MixretError for bad options or input (before anything is written) and Interrupted when SIGINT or
    SIGTERM stopped training (after writing a checkpoint).
    """
    cfg = dataclasses.replace(cfg, data=_normalize_data(cfg.data),
                              text_field=[cfg.text_field] if isinstance(cfg.text_field, str) else list(cfg.text_field),
                              **{name: _normalize_path(getattr(cfg, name)) for name in ("teacher", "init", "pairs")})
    cfg.validate()
    with Distributed.from_env() as dist:
        task = make_task(cfg, dist)
        schedule = cfg.loop_config()
        out = loop.train(task, schedule, dist, task.out, task.mode, seed=cfg.seed)
        if out == task.out:
            task.say(f"done: {schedule.steps} steps; {task.result()}")
        return out


def make_task(cfg: TrainConfig, dist: Distributed) -> "TextTask":
    """The task of cfg.objective."""
    if cfg.objective == "spans":
        return SpanTask(cfg, dist)
    if cfg.objective == "distill":
        return DistillTask(cfg, dist)
    return PretrainTask(cfg, dist)




class PretrainTask(TextTask):
    """Next-token prediction (the objective "clm"), with the validation loss against a unigram model's."""
    name = "pretrain"
    unit = "tokens"
    metric_keys = ("val_loss",)

    def make_objective(self) -> NextTokenLoss:
        self.unigram = unigram_loss(self.train_seqs, self.val_seqs, self.tokenizer.vocab_size)
        self.curve_reference = (self.unigram, "unigram (validation)")
        self.val_loss = float("nan")
        return NextTokenLoss(self.model, self.cfg.label_smoothing)

    def micro_batch(self, idx: np.ndarray, step: int, j: int):
        return self.train_seqs.batch(idx, self.tokenizer.pad_id).to(self.dist.device)

    def evaluate(self) -> dict:
        """Mean cross-entropy (no label smoothing) over every predicted token of the validation split."""
        B, dist = self.cfg.batch_size, self.dist
        total = torch.zeros(2, dtype=torch.float64, device=dist.device)  # [loss sum, predicted tokens]
        for b in range(dist.rank, math.ceil(len(self.val_seqs) / B), dist.world_size):
            batch = self.val_seqs.batch(self.val_order[b * B:(b + 1) * B], self.tokenizer.pad_id).to(dist.device)
            with loop.autocast(dist.device):
                total[0] += self.objective.summed(batch.input_ids, batch.positions, batch.targets, 0.0).double()
            total[1] += batch.targets.numel()
        dist.sum(total)
        self.val_loss = float(total[0] / total[1])
        if sample_hook is not None and dist.main:
            text = sample_hook(self.model, self.tokenizer)
            if text:
                self.say(text)
        return {"val_loss": round(self.val_loss, 5)}

    def describe_objective(self) -> str:
        return f"next-token prediction; a unigram model's validation loss is {self.unigram:.4f}"

    def result(self) -> str:
        return f"validation loss {self.val_loss:.4f} (unigram model: {self.unigram:.4f})"
