"""Contrastive fine-tuning: a language model trained as a bi-encoder on (query, document) pairs.

Each step embeds a batch of B queries and their B documents with the same model (`mixret.embed.pool`, so the
pooling is exactly the one `encode` uses later) and scores every query against every document of the batch:
logits = q_i . d_j / temperature on L2-normalised embeddings. The loss is InfoNCE with in-batch negatives,
cross-entropy of each query over the B documents (and, symmetric, of each document over the B queries).
With BM25 hard negatives, each query also brings the training document that BM25 ranks highest for it
without being its own, so the document side holds 2B texts.

Batches group texts of similar length (sorted by document length into chunks of 50 batches, shuffled within
and across chunks); the order depends only on (seed, epoch), so a resumed run sees the same batches. Pairs
whose query or document text repeats an earlier pair's are dropped first (they would be false negatives).

Validation: R@1 and MRR@10 of a held-out slice of the training pairs, each query against all the slice's
documents. The same slice fits the weight of `fusion` search when training ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixret.embed import pool
from mixret.errors import MixretError

LENGTH_CHUNK = 50        # batches per length-sorted chunk


@dataclass
class PairTokens:
    """Model inputs of the pairs: [bos] + text tokens, at most max_length each."""
    queries: list[list[int]]
    documents: list[list[int]]
    truncated: int


def tokenize_pairs(tokenizer, pairs, max_length: int) -> PairTokens:
    from mixret.embed import token_sequences
    q, tq = token_sequences(tokenizer, [p.query for p in pairs], max_length, "last")
    d, td = token_sequences(tokenizer, [p.target for p in pairs], max_length, "last")
    return PairTokens(q, d, tq + td)


def distinct_pairs(pairs) -> tuple[list, int]:
    """Pairs whose query and document texts both occur for the first time -> (kept, dropped count)."""
    seen_q, seen_d, kept = set(), set(), []
    for p in pairs:
        if p.query in seen_q or p.target in seen_d:
            continue
        seen_q.add(p.query)
        seen_d.add(p.target)
        kept.append(p)
    return kept, len(pairs) - len(kept)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's batches [n_batches, batch_size] of pair indices (the remainder is dropped), grouped by length."""
    n = len(lengths) // batch_size * batch_size
    if n == 0:
        raise MixretError(f"{len(lengths)} training pairs cannot fill one batch of {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))[:n]
    chunk = batch_size * LENGTH_CHUNK
    for s in range(0, n, chunk):                                     # sort each chunk by length
        part = perm[s:s + chunk]
        perm[s:s + chunk] = part[np.argsort(lengths[part], kind="stable")]
    batches = perm.reshape(-1, batch_size)
    return batches[rng.permutation(len(batches))]


class PairStream:
    """The batch of every step: step s is batch s % n of epoch s // n; a pure function of (seed, step)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.per_epoch = len(lengths) // batch_size
        self._epoch, self._batches = None, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.lengths, self.batch_size, self.seed, epoch)
        return self._batches[i]


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded ids [B, L] and 0/1 mask [B, L]."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


class BiEncoder(nn.Module):
    """A language model as a bi-encoder, with the InfoNCE loss and its temperature (fixed or learned)."""

    def __init__(self, lm: nn.Module, pooling: str, temperature: float, learn_temperature: bool,
                 symmetric: bool = True):
        super().__init__()
        if not temperature > 0:
            raise MixretError(f"the temperature must be positive, got {temperature}")
        self.lm, self.pooling, self.symmetric = lm, pooling, symmetric
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_scale.detach()))

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, D], unit norm
        return F.normalize(pool(self.lm, ids, mask, self.pooling), dim=-1)

    def forward(self, q_ids, q_mask, d_ids, d_mask) -> torch.Tensor:
        """Queries [B, Lq] against documents [B + H, Ld] (row i the gold of query i, H hard negatives after)."""
        q, d = self.embed(q_ids, q_mask), self.embed(d_ids, d_mask)     # [B, D], [B + H, D]
        logits = self.log_scale.clamp(max=math.log(100.0)).exp() * q @ d.T   # [B, B + H]
        gold = torch.arange(len(q), device=q.device)
        loss = F.cross_entropy(logits, gold)
        if self.symmetric:
            loss = (loss + F.cross_entropy(logits[:, :len(q)].T, gold)) / 2
        return loss


def bm25_hard_negatives(documents: list[str], queries: list[str], depth: int = 10) -> np.ndarray:
    """For each query i, the document BM25 ranks highest among those that are not document i -> [N] indices."""
    from mixret.search import BM25Index
    index = BM25Index(documents)
    _, top = index.search(queries, min(depth, len(documents)))
    out = np.empty(len(queries), dtype=np.int64)
    rng = np.random.default_rng(0)
    for i, row in enumerate(top):
        others = row[row != i]
        out[i] = others[0] if len(others) else rng.choice(np.delete(np.arange(len(documents)), i))
    return out


@torch.no_grad()
def rank_metrics(q: torch.Tensor, d: torch.Tensor) -> dict:
    """Query i's gold is document i; unit-norm q [N, D], d [N, D] -> R@1 and MRR@10 by cosine (ties lose)."""
    scores = q @ d.T
    gold = scores.diagonal().unsqueeze(1)
    rank = (scores >= gold).sum(1).float()          # pessimistic: every document scoring as high ranks first
    return {"val_r1": float((rank == 1).float().mean()),
            "val_mrr10": float(torch.where(rank <= 10, 1.0 / rank, torch.zeros_like(rank)).mean())}
