"""The matcher: a bidirectional MLP-Mixer that picks a query's target out of a set of candidates.

Slot 0 holds the query embedding, slots 1..context-1 hold candidate target embeddings in random
order; a Linear(d_model, 1) head gives one logit per candidate slot and training minimises the
softmax cross-entropy against the slot of the true target. Token mixing is a learned
(context x context) matrix with no mask, so every slot sees every other slot.

Embeddings from a causal LM share a large mean component, so the matcher standardises them with
per-dimension mean and std fitted on the training split (buffers, saved with the weights). Each
candidate slot is fed proj(c) + proj'(c * A q), the standardised candidate and its elementwise
product with a learned linear map A of the standardised query (A starts as the identity). The
product gives the head a direct query-candidate similarity signal from the first step; without it
the model must first learn to route the query through token mixing and sits at chance loss for
hundreds of steps. A lets it learn a full bilinear match when targets are not simply close to
their queries. Token mixing starts at zero, so nothing but training makes one slot differ from
another and the logits follow their candidate when the slots are permuted.

Score features (optional, `features` in the config): each candidate slot also gets Linear(F, d_model) of
its per-candidate scores, each z-scored over the present candidates of its set: "bm25", the candidate's
BM25 score for the query (given by the caller: a BM25 index over the targets), and "cosine", the cosine of
the raw query and candidate embeddings (computed here, as the vector index's dense score). The matcher can
then learn the fusion of lexical and dense evidence with its own match signal. Its sets at search time are
shortlists, so training with features draws hard negatives from the BM25 and dense neighbours.

Duplicates: `train_matcher` refuses repeated query embeddings (`dedupe_queries` drops them and says
how many); identical target embeddings are treated as one target, so a candidate set never holds
the true target twice nor a copy of it as a negative.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixret import io
from mixret.data import load_split, sources_record
from mixret.distributed import Distributed
from mixret.errors import MixretError
from mixret.models.encode import POOLINGS, EmbeddingSpec, encode, resolve_spec
from mixret.models.matcher import Matcher, MatcherConfig, score_candidates
from mixret.models.zoo import load
from mixret.options import nested, option
from mixret.retrieval.bm25 import BM25Index
from mixret.retrieval.embeddings import default_model_dir, load_emb_dir
from mixret.training import loop
from mixret.training.loop import Task

HARD_POOL_FACTOR = 4  # hard negatives are drawn each step from this many times K nearest targets




# -- model ------------------------------------------------------------------------------------









# -- candidate sets ---------------------------------------------------------------------------

def sample_candidates(true_index: torch.Tensor, n_targets: int, n_slots: int, generator: torch.Generator,
                      hard_pool: torch.Tensor | None = None, hard_negatives: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate sets of n_slots distinct targets out of n_targets, one holding each true target.

    true_index [B] -> (sets [B, n_slots] target indices, positions [B] slot of the true target).
    hard_pool [B, P]: each row's nearest targets (distinct, never the true one); hard_negatives of
    them are drawn per row without replacement, the remaining negatives uniformly from all other
    targets. Random negatives are a window of one random permutation of the targets starting at a
    random offset per row (a uniform subset for each row at O(n_targets + B * n_slots) cost), from
    which the true target and the row's hard negatives are filtered out.
    """
    B, K = len(true_index), hard_negatives
    n_rand = n_slots - 1 - K
    if n_slots > n_targets:
        raise MixretError(f"cannot build candidate sets of {n_slots} distinct targets from {n_targets}")
    true_index = true_index.long()
    if K:
        pick = torch.rand(B, hard_pool.shape[1], generator=generator).argsort(1)[:, :K]
        hard = hard_pool.gather(1, pick)                                           # [B, K]
    else:
        hard = true_index.new_empty(B, 0)
    width = n_slots  # enough that n_rand survive removing the true target and K hard ones
    perm = torch.randperm(n_targets, generator=generator)
    start = torch.randint(0, n_targets, (B, 1), generator=generator)
    window = perm[(start + torch.arange(width)) % n_targets]                       # [B, width]
    excluded = (window == true_index[:, None]) | (window[:, :, None] == hard[:, None, :]).any(-1)
    keep = excluded.to(torch.uint8).argsort(dim=1, stable=True)[:, :n_rand]
    negatives = window.gather(1, keep)                                             # [B, n_rand]
    full = torch.cat([true_index[:, None], hard, negatives], dim=1)                # [B, n_slots]
    shuffle = torch.rand(B, n_slots, generator=generator).argsort(1)
    sets = full.gather(1, shuffle)
    positions = shuffle.argmin(1)  # the slot that took column 0, the true target
    return sets, positions


def build_eval_sets(n_targets: int, context: int, seed: int, true_index: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed candidate sets for evaluation: the same seed always gives the same sets.

    Query i's true target is target i (or true_index[i]) -> (sets [Q, context-1] LongTensor,
    positions [Q] LongTensor, slot of the true target in each set).
    """
    if true_index is None:
        true_index = torch.arange(n_targets)
    g = torch.Generator().manual_seed(seed)
    return sample_candidates(true_index, n_targets, context - 1, g)


def hard_negative_pool(queries: torch.Tensor, targets: torch.Tensor, true_index: torch.Tensor,
                       size: int, query_mean: torch.Tensor, target_mean: torch.Tensor) -> torch.Tensor:
    """Each query's `size` nearest targets by cosine of centred embeddings, true target excluded.

    queries [Q, E], targets [T, E] (distinct), true_index [Q] -> LongTensor [Q, size].
    Uses an exact FAISS inner-product index over L2-normalised vectors.
    """
    import faiss

    def prep(x, mean):
        return F.normalize(x.float() - mean.float().cpu(), dim=-1).numpy()

    tv, qv = prep(targets, target_mean), prep(queries, query_mean)
    index = faiss.index_factory(tv.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(tv)
    _, nn_ids = index.search(qv, size + 1)
    nn_ids = torch.from_numpy(nn_ids)                                              # [Q, size+1]
    is_true = nn_ids == true_index[:, None]
    keep = is_true.to(torch.uint8).argsort(dim=1, stable=True)[:, :size]
    return nn_ids.gather(1, keep)


def lexical_pool(pairs: "PairSet", lexical, size: int, dense_pool: torch.Tensor) -> torch.Tensor:
    """Each query's hard-negative pool drawn from both shortlists: its BM25 top targets (lexical, a BM25Index
    over pairs.target_texts) and its dense nearest (dense_pool [Q, size]), interleaved, the first `size`
    distinct ones, true target excluded -> LongTensor [Q, size]."""
    _, top = lexical.search(pairs.query_texts, min(size + 1, len(pairs.targets)))       # [Q, size+1]
    out = torch.empty(len(pairs.queries), size, dtype=torch.long)
    for i, (lex, dense) in enumerate(zip(top.tolist(), dense_pool.tolist())):
        true = int(pairs.true_index[i])
        merged = dict.fromkeys(x for pair in zip(dense, lex) for x in pair if x != true)  # >= size: dense alone
        out[i] = torch.tensor(list(merged)[:size])
    return out


# -- input checks -----------------------------------------------------------------------------

@dataclass
class PairSet:
    """Aligned (query, target) embeddings with identical targets merged, and their texts when known."""
    queries: torch.Tensor     # [Q, E]
    targets: torch.Tensor     # [T, E] distinct target embeddings
    true_index: torch.Tensor  # [Q] row of each query's target in `targets`
    query_texts: list[str] | None = None   # [Q]
    target_texts: list[str] | None = None  # [T], the first text of each merged target


def as_pair_set(queries, targets, name: str, context: int, texts: tuple[list, list] | None = None) -> PairSet:
    """Validate aligned query/target embedding arrays (and their texts, (queries, targets), when given) and
    merge identical targets."""
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    t = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    if q.ndim != 2 or t.ndim != 2:
        raise MixretError(f"{name}: expected 2-D embedding arrays [N, E], got query shape "
                          f"{tuple(q.shape)} and target shape {tuple(t.shape)}")
    if q.shape[0] != t.shape[0]:
        raise MixretError(f"{name}: {q.shape[0]} query embeddings but {t.shape[0]} target embeddings; "
                          "pairs must be aligned by row")
    if q.shape[1] != t.shape[1]:
        raise MixretError(f"{name}: query embeddings have dim {q.shape[1]} but target embeddings have dim "
                          f"{t.shape[1]}; embed both sides with the same model")
    for side, x in (("query", q), ("target", t)):
        bad = (~torch.isfinite(x)).any(1)
        if bad.any():
            rows = bad.nonzero().flatten()[:5].tolist()
            raise MixretError(f"{name}: {int(bad.sum())} {side} embedding(s) contain NaN or inf "
                              f"(rows {rows}{'...' if bad.sum() > 5 else ''}); expected finite values")
    n_dup = q.shape[0] - torch.unique(q, dim=0).shape[0]
    if n_dup:
        raise MixretError(f"{name}: {n_dup} duplicate query embedding(s) among {q.shape[0]}; a query must "
                          "have one target (drop them first, e.g. with mixret.training.matcher.dedupe_queries)")
    uniq, inverse = torch.unique(t, dim=0, return_inverse=True)
    if uniq.shape[0] < context - 1:
        raise MixretError(f"{name}: {uniq.shape[0]} distinct targets, but context {context} needs at least "
                          f"{context - 1} (one true target and {context - 2} negatives); "
                          "use more pairs or a smaller context")
    if texts is None:
        return PairSet(q, uniq, inverse)
    query_texts, target_texts = (list(x) for x in texts)
    if len(query_texts) != q.shape[0] or len(target_texts) != q.shape[0]:
        raise MixretError(f"{name}: {q.shape[0]} embedded pairs but {len(query_texts)} query texts and "
                          f"{len(target_texts)} target texts; expected one of each per pair")
    first = torch.full((uniq.shape[0],), q.shape[0]).scatter_reduce(0, inverse, torch.arange(q.shape[0]), "amin")
    return PairSet(q, uniq, inverse, query_texts, [target_texts[i] for i in first.tolist()])


def check_split_sizes(n_train: int, n_test: int, context: int) -> None:
    """Refuse splits too small for candidate sets of context-1 distinct targets, before embedding them."""
    for name, n in (("train", n_train), ("test", n_test)):
        if n < context - 1:
            raise MixretError(f"the {name} split has {n} pairs, but context {context} needs at least {context - 1} "
                              f"(one true target and {context - 2} negatives); use more pairs, a smaller context"
                              + (" or a larger test fraction" if name == "test" else ""))


def dedupe_queries(queries, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the first pair of each distinct query embedding -> (queries, targets, kept row indices)."""
    q = np.asarray(queries)
    _, first = np.unique(q, axis=0, return_index=True)
    keep = np.sort(first)
    return q[keep], np.asarray(targets)[keep], keep


def embed_pairs(pairs: list, model: str | os.PathLike | None = None,
                query_emb: str | os.PathLike | None = None, target_emb: str | os.PathLike | None = None,
                batch_size: int = 64, pooling: str | None = None):
    """Embeddings of each pair's query and target -> (queries [N, E], targets [N, E], EmbeddingSpec).

    Either embeds both sides with the language model folder `model` (pooling: as `mixret embed` takes it,
    default the model's own or last; the whole context), or takes the rows of two embedding folders written
    by `mixret embed`, matched to the pairs by id, which must have been made alike (mixret.models.encode.EmbeddingSpec:
    same model, pooling and max_length; a given pooling must agree with theirs).
    """
    if model is not None and (query_emb is None and target_emb is None):
        lm = load(model)
        spec = resolve_spec(lm, pooling)
        q = encode(lm, [p.query for p in pairs], batch_size=batch_size, pooling=spec.pooling,
                   max_length=spec.max_length)
        t = encode(lm, [p.target for p in pairs], batch_size=batch_size, pooling=spec.pooling,
                   max_length=spec.max_length)
        return q, t, spec
    if model is None and query_emb is not None and target_emb is not None:
        (q, q_meta), (t, t_meta) = (_emb_rows(pairs, query_emb, "query"), _emb_rows(pairs, target_emb, "target"))
        spec = EmbeddingSpec.of(q_meta)
        spec.check(EmbeddingSpec.of(t_meta), f"the query embeddings {query_emb}", f"the target embeddings {target_emb}")
        spec.check(EmbeddingSpec(None, pooling, None), f"the query embeddings {query_emb}", "--pooling")
        return q, t, spec
    raise MixretError("give either a model to embed with, or both a query and a target embedding folder")


def _emb_rows(pairs: list, emb_dir, role: str) -> tuple[np.ndarray, dict]:
    """Rows of an embedding folder for each pair's `role` ('query' or 'target') text, by pair id."""
    emb, ids, texts, meta = load_emb_dir(emb_dir)
    row = {i: k for k, i in enumerate(ids)}
    if len(row) != len(ids):
        raise MixretError(f"{emb_dir}: {len(ids) - len(row)} repeated ids; expected one row per pair id")
    missing = [p.id for p in pairs if p.id not in row]
    if missing:
        raise MixretError(f"{emb_dir}: no embedding for {len(missing)} of {len(pairs)} pair ids "
                          f"(e.g. {missing[:3]}); expected the pairs' {role} texts embedded with their ids")
    idx = np.array([row[p.id] for p in pairs], dtype=np.int64)
    differ = [p.id for p, k in zip(pairs, idx) if texts[k] != getattr(p, role)]
    if differ:
        raise MixretError(f"{emb_dir}: the embedded text of {len(differ)} pair ids differs from the pairs' "
                          f"{role} text (e.g. id {differ[0]!r}); expected embeddings of the {role} field")
    return emb[idx], meta


# -- evaluation -------------------------------------------------------------------------------

IN_SET_NOTE = ("in-set scores: each query's target among the candidates of its own set (top-1, MRR, CE), not "
               "retrieval over a corpus; `mixret evaluate` measures retrieval")


@torch.no_grad()
def evaluate(matcher: Matcher, pairs: PairSet, sets: torch.Tensor, positions: torch.Tensor,
             batch_size: int = 512, mask: torch.Tensor | None = None, bm25: torch.Tensor | None = None) -> dict:
    """Cross-entropy, top-1 accuracy and MRR of the matcher on fixed candidate sets [Q, N]; mask [Q, N]
    (False = padded slot) marks the real candidates of partly padded sets; bm25 [Q, N] their BM25 scores,
    for a matcher with that feature."""
    logits = torch.cat([
        torch.from_numpy(score_candidates(matcher, pairs.queries[i:i + batch_size],
                                          pairs.targets[sets[i:i + batch_size]], batch_size,
                                          None if mask is None else mask[i:i + batch_size],
                                          None if bm25 is None else bm25[i:i + batch_size]))
        for i in range(0, len(sets), batch_size)])                                # [Q, N]
    return set_metrics(logits, positions, with_ce=True)


def cosine_baseline(pairs: PairSet, sets: torch.Tensor, positions: torch.Tensor,
                    query_mean: torch.Tensor | None = None, target_mean: torch.Tensor | None = None,
                    batch_size: int = 512) -> dict:
    """Top-1 and MRR when candidates are ranked by cosine similarity to the query (no training);
    with means given, the embeddings are centred first."""
    q, t = pairs.queries, pairs.targets
    if query_mean is not None:
        q, t = q - query_mean.cpu(), t - target_mean.cpu()
    q, t = F.normalize(q, dim=-1), F.normalize(t, dim=-1)
    scores = torch.cat([torch.einsum("qe,qne->qn", q[i:i + batch_size], t[sets[i:i + batch_size]])
                        for i in range(0, len(sets), batch_size)])                # [Q, N]
    return set_metrics(scores, positions, with_ce=False)


def set_metrics(scores: torch.Tensor, positions: torch.Tensor, with_ce: bool) -> dict:
    """Top-1, MRR (and CE) of scores [Q, N] with the true candidate at positions [Q]; -inf marks padding.

    Ties count against the target: it ranks below every candidate scoring at least as high, so constant
    scores give top-1 = 0 and MRR = 1/N."""
    true = scores.gather(1, positions[:, None])
    rank = (scores >= true).sum(1)  # the target itself, and every candidate that ties or beats it
    out = {"top1": (rank == 1).float().mean().item(), "mrr": (1.0 / rank.float()).mean().item()}
    if with_ce:
        out = {"ce": F.cross_entropy(scores, positions).item(), **out}
    return out


# -- training ---------------------------------------------------------------------------------

PADDED_SHARE = 0.5  # share of the training sets (and of the padded evaluation sets) with padded slots


def pad_sets(sets: torch.Tensor, positions: torch.Tensor, generator: torch.Generator, share: float = PADDED_SHARE,
             n_real: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random number of real candidates in a share of the sets, the rest of their slots padding, as
    in a tournament's last pass -> (sets, positions, mask [B, N], False = padded).

    The real candidates are the first n_real slots (2 <= n_real < N, uniform; or exactly `n_real` in every
    set when given); a true target beyond them is swapped into a random real slot."""
    B, N = sets.shape
    if n_real is None:
        real = torch.randint(2, N, (B,), generator=generator)
        real = torch.where(torch.rand(B, generator=generator) < share, real, torch.full_like(real, N))
    else:
        real = torch.full((B,), n_real, dtype=torch.long)
    slot = (torch.rand(B, generator=generator) * real).long()      # a random real slot for a displaced target
    moved = positions >= real
    new_pos = torch.where(moved, slot, positions)
    rows = torch.arange(B)
    sets = sets.clone()
    displaced = sets[rows, new_pos]
    sets[rows, new_pos] = sets[rows, positions]
    sets[rows, positions] = torch.where(moved, displaced, sets[rows, positions])
    mask = torch.arange(N)[None, :] < real[:, None]
    return sets, new_pos, mask


class SetLoss(nn.Module):
    """The matcher's objective: (summed cross-entropy of the true slots, number of sets) of a batch."""

    def __init__(self, matcher: Matcher):
        super().__init__()
        self.matcher = matcher

    def forward(self, batch: tuple) -> tuple[torch.Tensor, int]:
        queries, candidates, mask, positions, bm25 = batch          # [B, E], [B, N, E], [B, N], [B], [B, N] | None
        logits = self.matcher(queries, candidates, mask, bm25)      # [B, N], -inf at padded slots
        return F.cross_entropy(logits.float(), positions, reduction="sum"), len(positions)


@dataclass
class TrainMatcherConfig:
    """Everything `mixret train-matcher` takes: `run_train_matcher(TrainMatcherConfig(pairs=...))` is the command."""
    pairs: str | None = option(None, "Pairs file: .jsonl, .jsonl.gz, .parquet or TinyStoriesInstruct .txt.",
                               show="required")
    model: str | None = option(None, "Language model folder that embeds both sides.",
                               show="the newest model under ./runs")
    query_emb: str | None = option(None, "EMB_DIR of the query texts (from `mixret embed`), used instead of --model; "
                                         "rows matched by id.")
    target_emb: str | None = option(None, "EMB_DIR of the target texts, used with --query-emb.")
    query_field: str = option("summary", "Pairs field with the queries.")
    target_field: str = option("document", "Pairs field with the targets.")
    pooling: str | None = option(None, "How --model embeds the texts, as in `mixret embed`; with --query-emb it must "
                                       "agree with theirs. Recorded in the matcher.", choices=POOLINGS,
                                 show="the model's own, else last")
    matcher: MatcherConfig = nested(lambda: MatcherConfig(features=["bm25", "cosine"]), "the matcher network")
    run: MatcherRun = nested(lambda: MatcherRun(), "the schedule")
    out: str | None = option(None, "Output folder; an earlier matcher there is replaced once the new one is "
                                   "complete.", show="matchers/MODEL")
    test_fraction: float = option(0.1, "Share of pairs held out, by a hash of the id.")


@dataclass
class MatcherRun:
    """Options of a matcher run besides the model's: schedule, sampling and the run folder."""
    epochs: int = option(10, "Passes over the training pairs.")
    batch_size: int = option(256, "Queries (candidate sets) per step.")
    lr: float = option(1e-3, "Peak learning rate (warmup, then cosine decay).")
    seed: int = option(0, "Seed for initialisation, sampling and the test sets.")
    hard_negatives: int = option(0, "Candidates per set drawn from the query's nearest training targets (by dense "
                                    "cosine and BM25).", name="hard_candidates")
    budget_minutes: float | None = option(
        None, "Schedule length: as many steps as fit this many minutes on this machine, evaluations included "
              "(instead of --epochs; the resolved steps are saved with the run).")
    stop_after: int | None = option(None, "End this invocation after this many steps, with a checkpoint.")
    resume: bool = option(False, "Continue the run in --out from its newest checkpoint.", switch="--resume")
    overwrite: bool = option(False, "Replace the run in --out.", switch="--overwrite")
    progress: bool = option(True, "A progress bar.", cli=False)


RUN_IDENTITY = ("config", "batch_size", "seed", "hard_negatives")  # a resumed matcher run must keep them


def train_matcher(train_q, train_t, test_q, test_t, config: MatcherConfig,
                  out_dir: str | os.PathLike | None = None, device: str | None = None,
                  train_texts: tuple[list, list] | None = None, test_texts: tuple[list, list] | None = None,
                  **run_options) -> tuple[Matcher, dict]:
    """Train a matcher on aligned (query, target) embeddings -> (matcher in eval mode, metrics).

    Each step every query gets a fresh set of context-1 distinct candidates: its target plus
    context-2 negatives from the other training targets (`hard_negatives` of them drawn from the
    query's nearest targets: by dense cosine, and by BM25 as well when train_texts are given),
    shuffled; in half of the sets only a random number of the slots hold candidates and the rest
    are padding, as in a tournament's last pass. Evaluation uses fixed sets built
    from `seed`, full and partly padded. Training runs in `mixret.training.loop`: with out_dir, out_dir is the run
    folder (checkpoints, metrics.jsonl, train_config.json; then the matcher, and metrics.json), put in place
    at the end, replacing an earlier matcher there; the options of MatcherRun (run_options: epochs, batch_size, lr,
    seed, hard_negatives, resume, stop_after, overwrite, budget_minutes, progress) work as for `mixret pretrain`.
    Stopped early by stop_after, it returns the matcher so far and metrics with "checkpoint" (the folder written).
    train_texts and test_texts, (query texts, target texts) aligned with the embeddings, are needed by the bm25 feature.
    """
    run = MatcherRun(**run_options)
    epochs, batch_size, lr, seed, hard_negatives = run.epochs, run.batch_size, run.lr, run.seed, run.hard_negatives
    C = config.context
    train = as_pair_set(train_q, train_t, "train split", C, train_texts)
    test = as_pair_set(test_q, test_t, "test split", C, test_texts)
    if config.needs_bm25 and (train_texts is None or test_texts is None):
        raise MixretError(f"matcher features {config.features} include bm25: train_matcher needs the pairs' "
                          "texts (train_texts and test_texts)")
    if train.queries.shape[1] != config.emb_dim or test.queries.shape[1] != config.emb_dim:
        raise MixretError(f"matcher config has emb_dim {config.emb_dim} but the embeddings have dim "
                          f"{train.queries.shape[1]} (train) and {test.queries.shape[1]} (test)")
    if not 0 <= hard_negatives <= C - 2:
        raise MixretError(f"hard_negatives must be between 0 and context-2 = {C - 2}, got {hard_negatives}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise MixretError(f"epochs and batch_size must be positive and lr > 0, got {epochs}, {batch_size}, {lr}")
    if run.budget_minutes is not None and not run.budget_minutes > 0:
        raise MixretError(f"budget_minutes must be a positive number, got {run.budget_minutes!r}")

    out = Path(out_dir) if out_dir is not None else None
    with Distributed.from_env(device) as dist:
        task = MatcherTask(train, test, config, run, dist)
        mode = "fresh"
        if out is not None:
            mode = dist.on_main(lambda: loop.inspect_run_dir(out, task.options(), RUN_IDENTITY, run.resume,
                                                             run.overwrite, task.files, "mixret train-matcher",
                                                             replaces="matcher"))
        schedule = loop.LoopConfig(
            steps=None if run.budget_minutes is not None else epochs * task.steps_per_epoch,
            budget_minutes=run.budget_minutes, lr=lr, weight_decay=0.01, betas=(0.9, 0.98), grad_clip=1.0,
            log_every=task.steps_per_epoch, eval_every=task.steps_per_epoch,
            checkpoint_every=task.steps_per_epoch, stop_after=run.stop_after, progress=run.progress)
        result = loop.train(task, schedule, dist, out, mode or "fresh", seed=seed)
    task.matcher.eval()
    if out is not None and result != out:
        return task.matcher, {**task.metrics, "checkpoint": str(result)}
    return task.matcher, task.final_metrics()


class MatcherTask(Task):
    """What matcher training gives the loop: the matcher, candidate sets by step, the set loss, evaluation."""
    name = "train-matcher"
    unit = "queries"
    files = (io.CONFIG_NAME, io.WEIGHTS_NAME, "metrics.json")

    def __init__(self, train: PairSet, test: PairSet, config: MatcherConfig, run: MatcherRun, dist):
        C, seed = config.context, run.seed
        self.train, self.test, self.config, self.run = train, test, config, run
        torch.manual_seed(seed)
        self.matcher = Matcher(config).to(dist.device)
        self.matcher.fit_standardization(train.queries, train.targets)
        self.objective = SetLoss(self.matcher)
        self.steps_per_epoch = math.ceil(len(train.queries) / run.batch_size)
        self.fingerprint = _embeddings_hash(train, test)

        # fixed evaluation sets: all of test (full, and partly padded), and a subset of train of about its size
        self.test_sets, self.test_pos = build_eval_sets(len(test.targets), C, seed, test.true_index)
        self.padded_sets = pad_sets(self.test_sets, self.test_pos, torch.Generator().manual_seed(seed + 2))
        g = torch.Generator().manual_seed(seed)
        sub = torch.randperm(len(train.queries), generator=g)[:max(len(test.queries), 1024)].sort().values
        self.train_eval = PairSet(train.queries[sub], train.targets, train.true_index[sub],
                                  None if train.query_texts is None else [train.query_texts[i] for i in sub],
                                  train.target_texts)
        self.train_sets, self.train_pos = build_eval_sets(len(train.targets), C, seed + 1,
                                                          self.train_eval.true_index)
        # BM25 over each split's targets: the bm25 feature's scores, and the training pool's lexical neighbours
        self.train_bm25 = (BM25Index(train.target_texts) if train.target_texts is not None
                           and (config.needs_bm25 or run.hard_negatives) else None)
        self.test_bm25 = BM25Index(test.target_texts) if config.needs_bm25 else None
        self.test_lex = self.set_bm25(self.test_bm25, test.query_texts, self.test_sets)
        self.padded_lex = self.set_bm25(self.test_bm25, test.query_texts, self.padded_sets[0])
        self.train_lex = self.set_bm25(self.train_bm25, self.train_eval.query_texts, self.train_sets)
        self.hard_pool = None
        if run.hard_negatives:
            size = min(HARD_POOL_FACTOR * run.hard_negatives, len(train.targets) - 1)
            self.hard_pool = hard_negative_pool(train.queries, train.targets, train.true_index, size,
                                                self.matcher.query_mean, self.matcher.target_mean)
            if self.train_bm25 is not None:
                self.hard_pool = lexical_pool(train, self.train_bm25, size, self.hard_pool)
        padded_real = self.padded_sets[2].sum(1).float()
        self.metrics = {
            "note": IN_SET_NOTE,
            "context": C, "n_candidates": C - 1,
            "chance_ce": math.log(C - 1), "chance_top1": 1.0 / (C - 1),
            "chance_top1_padded": (1.0 / padded_real).mean().item(),
            "padded_sets": f"{PADDED_SHARE:.0%} of the test sets keep 2 to {C - 2} real candidates, the rest "
                           "of their slots padded (as in a tournament's last pass)",
            "n_train": len(train.queries), "n_test": len(test.queries),
            "n_train_targets": len(train.targets), "n_test_targets": len(test.targets),
            "n_train_eval": len(self.train_eval.queries),
            "epochs": run.epochs, "batch_size": run.batch_size, "lr": run.lr, "seed": seed,
            "hard_negatives": run.hard_negatives, "params": self.matcher.num_params(),
            "config": config.to_dict(),
            "test_cosine": cosine_baseline(test, self.test_sets, self.test_pos),
            "test_centered_cosine": cosine_baseline(test, self.test_sets, self.test_pos,
                                                    self.matcher.query_mean, self.matcher.target_mean),
            "untrained_test": evaluate(self.matcher, test, self.test_sets, self.test_pos, bm25=self.test_lex),
        }
        self.step_losses: dict[int, float] = {}

    def set_bm25(self, index, query_texts: list[str] | None, sets: torch.Tensor) -> torch.Tensor | None:
        """BM25 scores [B, N] of the targets in sets [B, N] for their queries, when the matcher takes them."""
        if not self.config.needs_bm25:
            return None
        return torch.from_numpy(index.scores_of(query_texts, sets.numpy()))

    def batches(self, start: int, dist, grad_accum: int):
        """The sets of step s: the rows of the epoch's seeded permutation, candidates drawn with a generator
        seeded by (seed, s); a function of the step alone, so a resumed run sees the same sets."""
        C, B, run, train = self.config.context, self.run.batch_size, self.run, self.train
        targets = train.targets.to(dist.device)
        for step in range(start, 2**62):
            epoch, i = divmod(step, self.steps_per_epoch)
            order = torch.randperm(len(train.queries),
                                   generator=torch.Generator().manual_seed(1_000_003 * run.seed + epoch))
            g = torch.Generator().manual_seed(1_000_003 * (run.seed + 1) + step + 2**40)
            rows = order[i * B:(i + 1) * B]                                               # [B]
            sets, pos = sample_candidates(train.true_index[rows], len(train.targets), C - 1, g,
                                          self.hard_pool[rows] if self.hard_pool is not None else None,
                                          run.hard_negatives)                             # [B, C-1], [B]
            sets, pos, mask = pad_sets(sets, pos, g)
            lex = self.set_bm25(self.train_bm25, train.query_texts and [train.query_texts[r] for r in rows], sets)
            micro = []
            for part in torch.arange(len(rows)).chunk(grad_accum * dist.world_size)[dist.rank::dist.world_size]:
                micro.append((train.queries[rows[part]].to(dist.device), targets[sets[part].to(dist.device)],
                              mask[part].to(dist.device), pos[part].to(dist.device),
                              None if lex is None else lex[part].to(dist.device)))
            yield micro

    def on_step(self, step: int, loss: torch.Tensor) -> None:
        self.step_losses[step] = loss.item()

    def evaluate(self) -> dict:
        sets, pos, mask = self.padded_sets
        return {"test": evaluate(self.matcher, self.test, self.test_sets, self.test_pos, bm25=self.test_lex),
                "test_padded": evaluate(self.matcher, self.test, sets, pos, mask=mask, bm25=self.padded_lex)}

    def record_extra(self, step: int) -> dict:
        return {"epoch": step / self.steps_per_epoch}

    def options(self) -> dict:
        return {"config": self.config.to_dict(), "epochs": self.run.epochs, "batch_size": self.run.batch_size,
                "lr": self.run.lr, "seed": self.run.seed, "hard_negatives": self.run.hard_negatives,
                "budget_minutes": self.run.budget_minutes}

    def final_metrics(self) -> dict:
        """metrics.json: the baselines, the last evaluation and a train-subset evaluation."""
        if "test" not in self.metrics:
            self.matcher.eval()
            final = self.evaluate()
            losses = [self.step_losses[s] for s in sorted(self.step_losses)]
            first = min(self.step_losses, default=1)
            leave = steps_to_leave_chance(losses, math.log(self.config.context - 1))
            self.metrics.update({
                **final,
                "train": evaluate(self.matcher, self.train_eval, self.train_sets, self.train_pos,
                                  bm25=self.train_lex),
                "steps": max(self.step_losses, default=0),
                "steps_to_leave_chance": None if leave is None else leave + first - 1,
            })
        return self.metrics

    def finish(self) -> None:
        self.final_metrics()

    def save(self, directory: Path) -> None:
        self.matcher.save_pretrained(directory)
        if "test" in self.metrics:
            io.write_json(Path(directory) / "metrics.json", self.metrics)

    def load(self, directory: Path) -> None:
        io.load_weights(self.matcher, directory)


def _embeddings_hash(*pair_sets: PairSet) -> str:
    import hashlib
    h = hashlib.blake2b(digest_size=16)
    for p in pair_sets:
        for t in (p.queries, p.targets, p.true_index):
            h.update(t.contiguous().numpy().tobytes())
        for text in (p.query_texts or []) + (p.target_texts or []):
            h.update(text.encode() + b"\0")
    return h.hexdigest()


def steps_to_leave_chance(losses: list[float], chance: float, window: int = 10, margin: float = 0.9) -> int | None:
    """First step at which the mean loss over the last `window` steps is below margin * chance."""
    for i in range(window, len(losses) + 1):
        if sum(losses[i - window:i]) / window < margin * chance:
            return i
    return None


def format_summary(metrics: dict) -> str:
    """A short table of in-set test (and train) scores against chance and the cosine baselines."""
    rows = [
        ("matcher, test", metrics["test"]),
        ("matcher, test, padded", metrics["test_padded"]),
        ("matcher, train subset", metrics["train"]),
        ("untrained matcher, test", metrics["untrained_test"]),
        ("cosine, test", metrics["test_cosine"]),
        ("centred cosine, test", metrics["test_centered_cosine"]),
        ("chance", {"ce": metrics["chance_ce"], "top1": metrics["chance_top1"]}),
        ("chance, padded", {"top1": metrics["chance_top1_padded"]}),
    ]
    lines = [f"{metrics['n_test']} test queries, {metrics['n_candidates']} candidates each "
             f"(context {metrics['context']}); padded: {metrics['padded_sets']}",
             f"{IN_SET_NOTE}.",
             f"{'':<26}{'CE':>8}{'top-1':>8}{'MRR':>8}"]
    for name, m in rows:
        cells = [f"{m[k]:8.3f}" if k in m else f"{'-':>8}" for k in ("ce", "top1", "mrr")]
        lines.append(f"{name:<26}" + "".join(cells))
    return "\n".join(lines)


def matcher_on_pairs(train: list, test: list, q: np.ndarray, t: np.ndarray, spec: EmbeddingSpec, trained_on,
                     config: MatcherConfig, out_dir=None, say: Callable[[str], None] = lambda m: None,
                     **run_options) -> tuple[Matcher, dict]:
    """A matcher on the embeddings q, t of the pairs train + test (in that order): pairs whose query embedding
    repeats an earlier one in their split are dropped (said), the config records the embeddings' spec and
    trained_on, and `train_matcher` trains it with the pairs' texts (for the bm25 feature)."""
    splits, texts = {}, {}
    for name, part, rows in (("train", train, slice(0, len(train))), ("test", test, slice(len(train), None))):
        sq, st, keep = dedupe_queries(q[rows], t[rows])
        if len(keep) < len(q[rows]):
            say(f"{name} split: dropped {len(q[rows]) - len(keep)} pairs whose query embedding repeats an earlier "
                "one")
        splits[name] = (sq, st)
        texts[name] = ([part[i].query for i in keep], [part[i].target for i in keep])
    config = dataclasses.replace(config, emb_dim=int(q.shape[1]), embedder=spec.model_hash, pooling=spec.pooling,
                                 max_length=spec.max_length, trained_on=trained_on)
    return train_matcher(*splits["train"], *splits["test"], config, out_dir=out_dir, train_texts=texts["train"],
                         test_texts=texts["test"], **run_options)


def run_train_matcher(cfg: TrainMatcherConfig, say: Callable[[str], None] = print) -> tuple[Path, dict]:
    """What `mixret train-matcher` does -> (the matcher folder, its metrics): the pairs file read and split
    (data.load_split), both sides embedded with the model (or read from two embedding folders), and a matcher
    trained on the training split and scored on the test split. Stopped early (stop_after), the metrics hold
    "checkpoint"."""
    if not cfg.pairs:
        raise MixretError("train-matcher needs a pairs file (--pairs)")
    model = cfg.model
    if cfg.query_emb is None and cfg.target_emb is None and model is None:
        model = str(default_model_dir())
    out = Path(cfg.out) if cfg.out else Path("matchers") / (
        Path(model).resolve().name if model else Path(cfg.query_emb or cfg.target_emb).resolve().parent.name)
    split = load_split(cfg.pairs, cfg.query_field, cfg.target_field, cfg.test_fraction)
    if split.repeated:
        say(f"{cfg.pairs}: dropped {split.repeated} pairs repeating an earlier query")
    say(f"{len(split.train)} train pairs, {len(split.test)} test pairs")
    check_split_sizes(len(split.train), len(split.test), cfg.matcher.context)
    if (out / io.CONFIG_NAME).is_file() and not cfg.run.overwrite:  # refuse another kind before embedding
        io.check_out_dir(out, io.CONFIG_NAME, "matcher", overwrite=True)
    q, t, spec = embed_pairs(split.train + split.test, model, cfg.query_emb, cfg.target_emb, pooling=cfg.pooling)
    _, metrics = matcher_on_pairs(split.train, split.test, q, t, spec, sources_record([cfg.pairs], cfg.test_fraction),
                                  cfg.matcher, out, say, **dataclasses.asdict(cfg.run))
    return out, metrics
