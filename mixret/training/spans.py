"""Spans as queries: a retriever trained on documents alone (`mixret pretrain --objective spans`).

    from mixret.training.pretrain import TrainConfig, pretrain
    out = pretrain(TrainConfig(data=["docs.jsonl"], objective="spans", budget_minutes=5))   # a model folder

Each step takes a batch of B training documents (the stream of mixret.training.pretrain, a function of the seed and the
step) and cuts from each a random span of span_min..span_max tokens (at most half of the document): span i is a
query whose positive is document i and whose negatives are the batch's other documents. The loss is symmetric
InfoNCE at a fixed temperature on L2-normalised pooled embeddings: `mixret.training.finetune.BiEncoder` with
`mixret.models.encode.pool`, so the embedding trained is the one that `finetune` trains and `encode` computes. A copy of
a document elsewhere in the batch is not a negative of its span. The spans of micro-batch j of step s come from
a generator seeded by (seed, s, j), so a resumed run draws the spans of an uninterrupted one.

The document side is the whole document, span included, not the document with the span cut out (the inverse
cloze task). Contriever found crops that may overlap better than the inverse cloze task; on the planted documents
of tests/planted.py (a masked mixer d64 x 2, 150 and 300 steps of 16) the whole document also retrieved unseen
documents from 4-word spans better: R@1 0.49 and 0.55 against 0.38 and 0.33 with the span cut out. And a search
matches queries against whole documents, as training then does.

Texts are model inputs as `mixret.models.encode.token_sequences` builds them: [bos] + tokens (+ [eos] for pooling eos),
at most the model's context. Validation: one span of each held-out document, drawn once with the seed, against
all held-out documents: R@1 and MRR@10 (chance R@1 is 1 / documents). The LM head plays no part and is frozen
(unless tied to the input embeddings), so every trained parameter gets a gradient, as DDP requires. The saved
model records its pooling and max_length, so `embed`, `index`, `search`, `evaluate` and `finetune` use it
without being told.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mixret.errors import MixretError
from mixret.models.encode import embed_sequences, pad_sequences
from mixret.training.finetune import BiEncoder, rank_metrics
from mixret.training.text_task import TextTask
from mixret.training.train_data import Sequences

VALIDATION_KEY = 2**62  # the generator key of the validation spans: past every step's


def draw_span(n: int, span_min: int, span_max: int, rng: np.random.Generator) -> tuple[int, int]:
    """(start, length) of a random span of n >= 1 tokens: span_min..span_max tokens, at most half of them (at
    least one), at a uniform start."""
    length = min(int(rng.integers(span_min, span_max + 1)), max(1, n // 2))
    return int(rng.integers(0, n - length + 1)), length


class SpanTask(TextTask):
    """The text-only task with spans as queries against the batch's documents (symmetric InfoNCE)."""
    name = "spans"
    unit = "spans"
    metric_keys = ("val_r1", "val_mrr10")

    def load_data(self) -> None:
        super().load_data()
        self.set_inputs()
        self.train_seqs, self.val_seqs = self.with_content(self.train_seqs), self.with_content(self.val_seqs)
        for name, seqs in (("training", self.train_seqs), ("validation", self.val_seqs)):
            if len(seqs) < 2:
                raise MixretError(f"{len(seqs)} {name} document(s) with text; spans need at least 2 (a span's "
                                  f"document against another)")

    def set_inputs(self) -> None:
        """The room for content tokens in the model inputs that encode makes: [bos] + content (+ [eos])."""
        self.tail = [self.tokenizer.eos_id] if self.cfg.pooling == "eos" else []
        self.room = self.cfg.model.context - 1 - len(self.tail)

    def with_content(self, seqs: Sequences) -> Sequences:
        """The sequences that hold a token besides bos and eos."""
        keep = seqs.ends - seqs.starts - 1 - (seqs.tokens[seqs.ends - 1] == self.tokenizer.eos_id) > 0
        return Sequences(seqs.tokens, seqs.starts[keep], seqs.ends[keep])

    def content(self, seqs: Sequences, i: int) -> np.ndarray:
        """Sequence i without bos and eos (a truncated document has no eos), cut to what fits the model."""
        tokens = seqs.tokens[seqs.starts[i] + 1:seqs.ends[i]]
        if len(tokens) and tokens[-1] == self.tokenizer.eos_id:
            tokens = tokens[:-1]
        return tokens[:self.room]

    def text(self, tokens: np.ndarray) -> list[int]:
        """Content tokens -> the model input that encode makes of them."""
        return [self.tokenizer.bos_id, *tokens.tolist(), *self.tail]

    def continue_from(self, lm) -> None:
        """A trained model's embedding: kept when it was trained to embed; a language model's gets the head."""
        if lm.needs_pool_head(self.cfg.pooling):
            lm.add_pool_head()

    # -- the objective -----------------------------------------------------------------------------
    def make_objective(self) -> BiEncoder:
        cfg = self.cfg
        self.model.embedding_defaults = {"pooling": cfg.pooling, "max_length": cfg.model.context}
        self.model.freeze_lm_head()
        rng = np.random.default_rng([cfg.seed, VALIDATION_KEY])
        self.val_queries, self.val_texts = [], []
        for i in range(len(self.val_seqs)):
            tokens = self.content(self.val_seqs, i)
            start, length = draw_span(len(tokens), cfg.span_min, cfg.span_max, rng)
            self.val_queries.append(self.text(tokens[start:start + length]))
            self.val_texts.append(self.text(tokens))
        self.last_metrics: dict = {}
        return BiEncoder(self.model, cfg.pooling, cfg.temperature, learn_temperature=False, symmetric=True)

    def micro_batch(self, idx: np.ndarray, step: int, j: int) -> tuple:
        """Documents idx [B] -> (span ids, span mask [B, Ls], document ids, document mask [B, Ld], excluded [B, B])
        as BiEncoder takes them: span i's positive is document i; excluded marks copies of it at other rows."""
        rng = np.random.default_rng([self.cfg.seed, step, j])
        spans, docs, keys = [], [], []
        for i in idx:
            tokens = self.content(self.train_seqs, i)
            start, length = draw_span(len(tokens), self.cfg.span_min, self.cfg.span_max, rng)
            spans.append(self.text(tokens[start:start + length]))
            docs.append(self.text(tokens))
            keys.append(tokens.tobytes())
        s_ids, s_mask = pad_sequences(spans, self.tokenizer.pad_id)
        d_ids, d_mask = pad_sequences(docs, self.tokenizer.pad_id)
        same = torch.tensor([[a == b for b in keys] for a in keys])
        excluded = same & ~torch.eye(len(keys), dtype=torch.bool)
        return tuple(t.to(self.dist.device) for t in (s_ids, s_mask, d_ids, d_mask, excluded))

    def evaluate(self) -> dict:
        """R@1 and MRR@10 of one span of each held-out document against all held-out documents."""
        B, pad, device = 64, self.tokenizer.pad_id, self.dist.device
        q = F.normalize(embed_sequences(self.model, self.val_queries, B, self.cfg.pooling, pad, device), dim=-1)
        d = F.normalize(embed_sequences(self.model, self.val_texts, B, self.cfg.pooling, pad, device), dim=-1)
        self.last_metrics = rank_metrics(q, d)
        return self.last_metrics

    def describe_objective(self) -> str:
        cfg, n = self.cfg, len(self.val_texts)
        return (f"spans of {cfg.span_min}-{cfg.span_max} tokens against the batch's documents, InfoNCE at "
                f"temperature {cfg.temperature:g}, pooling {cfg.pooling}; validation: a span of each of {n:,} "
                f"held-out documents against them all (chance R@1 {1 / n:.4f})")

    def result(self) -> str:
        n = len(self.val_texts)
        return (f"validation R@1 {self.last_metrics['val_r1']:.3f}, MRR@10 {self.last_metrics['val_mrr10']:.3f} "
                f"of a span of each of {n:,} held-out documents against them all (chance R@1 {1 / n:.4f})")
