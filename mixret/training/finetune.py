"""Contrastive fine-tuning: a language model trained as a bi-encoder on (query, document) pairs.

    from mixret.training.finetune import FinetuneConfig, finetune
    out = finetune(FinetuneConfig(pairs="pairs.jsonl", init="runs/mm", out="runs/mm-ft", budget_minutes=5))

Each step embeds a batch of B queries and their B documents with the same model (`mixret.models.encode.pool`, so the
pooling is exactly the one `encode` uses later) and scores every query against every document of the batch:
logits = q_i . d_j / temperature on L2-normalised embeddings. The loss is InfoNCE with in-batch negatives:
cross-entropy of each query over the batch's documents and (symmetric) of each document over the queries.
With BM25 hard negatives, each query also brings the training document BM25 ranks highest for it without
being its own, so the document side holds 2B texts (a hard negative that is another query's gold is masked
out for that query).

`init` is a model folder (a pretrained or fine-tuned model and its tokenizer) or an architecture name: then a
new model of the options' size starts from random init (`mixing_init` "mean" by default: its last position
starts as the mean of the text, so last-token pooling learns from the first step), with a BPE tokenizer
trained on the training pairs. The output is a model folder whose config records the pooling, so `embed`,
`search` and `evaluate` use it without being told, plus fusion.json: the weight of `fusion` search, and
bm25.json: BM25's k1, b and stemmer (mixret.retrieval.bm25), both fitted on the validation slice (the fusion weight
with the
fitted BM25).

Pairs: the held-out test split (by a hash of the id, as train-matcher and evaluate use) is never trained on;
pairs repeating an earlier pair's query or document text are dropped (they would be false negatives); of the
rest, `val_pairs` (chosen by a hash of the id) form the validation slice: R@1 and MRR@10 of each of its
queries against all its documents at every evaluation, and the pairs the fusion weight and BM25 are fitted on. Batches
group texts of similar length; the batches of a step depend only on (seed, step), so a resumed run sees the
batches an uninterrupted one saw.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixret import io
from mixret.data import bundled_pairs_path, load_pairs, sources_record, split_pairs
from mixret.distributed import Distributed
from mixret.errors import MixretError
from mixret.models.config import ARCHS, ModelConfig
from mixret.models.encode import POOLINGS, embed_sequences, pad_sequences, pool, token_sequences
from mixret.models.zoo import build_model, load
from mixret.options import nested, option, option_fields, read_options_file, replace_options
from mixret.retrieval.bm25 import BM25_NAME, BM25Index, BM25Params, fit_bm25, save_bm25
from mixret.retrieval.fusion import FUSION_METHODS, FUSION_NAME, Fusion, fit_weight, mrr_at
from mixret.retrieval.search import Retriever
from mixret.tokenizer import load_tokenizer, make_tokenizer
from mixret.training import loop
from mixret.training.loop import LoopConfig, Task

LENGTH_CHUNK = 50         # batches per length-sorted chunk
HARD_NEGATIVES = ("none", "bm25")
FINETUNE_MODEL = {"d_model": 256, "n_layers": 4, "context": 256, "mixing_init": "mean"}
FINETUNE_LOOP = {"steps": 500, "lr": 1e-3, "weight_decay": 0.01, "eval_every": 100, "log_every": 10,
                 "checkpoint_every": 200}  # a --budget-minutes replaces the steps


@dataclass
class FinetuneConfig:
    """Everything `mixret finetune` takes; `finetune(FinetuneConfig())` is the command with no options."""
    pairs: str | None = option(None, "(query, document) pairs: .jsonl, .jsonl.gz, .parquet or TinyStoriesInstruct "
                                     ".txt.", show="the bundled Debian pairs")
    query_field: str = option("summary", "Pairs field with the queries.")
    target_field: str = option("document", "Pairs field with the documents.")
    test_fraction: float = option(0.1, "Share of pairs held out as the test split (by a hash of the id) and never "
                                       "trained on; 0 when the test pairs are in another file.")
    val_pairs: int = option(500, "Training pairs kept aside for validation R@1 and for fitting the fusion weight and "
                                 "BM25's k1, b and stemmer (at most a fifth of them).")
    init: str = option("masked-mixer", "A model folder to fine-tune (from pretrain or finetune), or an architecture "
                                       "(masked-mixer, hypermixer, llama) to start from random init with the model "
                                       "options.", name="model")
    model: ModelConfig = nested(lambda: ModelConfig(**FINETUNE_MODEL), "random init: the new model", exclude=("arch",))
    pooling: str = option("last", "The embedding trained: last content token, mean of the text's tokens, or an "
                                  "appended eos; the output model embeds with it by default.", choices=POOLINGS)
    pool_head: bool = option(True, "last/eos pooling: embed through a trained head over the last layer that starts "
                                   "as the running mean of the text's hidden states (what lets a pretrained language "
                                   "model, whose last position predicts the next token, fine-tune without "
                                   "collapsing); off: the last layer's own state. A model folder that already embeds "
                                   "(from finetune or pretrain --objective spans) keeps its own embedding.")
    tokenizer: str = option("bpe-lower", "Random init: bpe-lower (BPE trained on the training pairs, case folded, as "
                                         "retrieval wants), bpe (case kept), bytes, or the path of a tokenizer.json.")
    vocab_size: int = option(2048, "Random init: BPE vocabulary size.")
    max_length: int | None = option(None, "Tokens per text, [bos] included; longer texts keep their start.",
                                    show="the context")
    batch_size: int = option(32, "Pairs per micro-batch: each query's in-batch negatives are the other documents of "
                                 "its batch.")
    temperature: float = option(0.05, "Softmax temperature of the InfoNCE loss.")
    learn_temperature: bool = option(False, "Train the temperature with the model.",
                                     switch="--learn-temperature/--fixed-temperature")
    symmetric: bool = option(True, "Also score each document against the batch's queries.",
                             switch="--symmetric/--one-way")
    hard_negatives: str = option("none", "bm25: each query also brings the training document BM25 ranks highest "
                                         "for it.", choices=HARD_NEGATIVES)
    token_dropout: float = option(0.1, "Fraction of each training text's tokens left out at each step (bos kept): a "
                                       "new view of every pair in every epoch.")
    fusion_method: str = option("convex", "How fusion search combines BM25 and the model (its weight is fitted on "
                                          "the validation pairs).", choices=FUSION_METHODS)
    seed: int = option(0, "Seed for initialisation and data order.")
    loop: LoopConfig = nested(lambda: LoopConfig(**FINETUNE_LOOP), "the schedule")
    out: str | None = option(None, "Output folder.", show="runs/MODEL-ft")
    resume: bool = option(False, "Continue the run in --out from its newest checkpoint (its saved options apply "
                                 "unless given again).", switch="--resume")
    overwrite: bool = option(False, "Replace the run in --out.", switch="--overwrite")

    def validate(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise MixretError(f"test_fraction must be in [0, 1), got {self.test_fraction!r}")
        for name, lo in (("val_pairs", 2), ("batch_size", 2), ("vocab_size", 259)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise MixretError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.token_dropout, (int, float)) and 0.0 <= self.token_dropout < 1.0):
            raise MixretError(f"token_dropout must be in [0, 1), got {self.token_dropout!r}")
        if self.max_length is not None and self.max_length < 2:
            raise MixretError(f"max_length must be at least 2 ([bos] and one token), got {self.max_length}")
        if not self.temperature > 0:
            raise MixretError(f"temperature must be positive, got {self.temperature!r}")
        if self.pooling not in POOLINGS:
            raise MixretError(f"unknown pooling {self.pooling!r}; expected one of {', '.join(POOLINGS)}")
        if self.hard_negatives not in HARD_NEGATIVES:
            raise MixretError(f"unknown hard_negatives {self.hard_negatives!r}; expected one of "
                              f"{', '.join(HARD_NEGATIVES)}")
        if self.fusion_method not in FUSION_METHODS:
            raise MixretError(f"unknown fusion method {self.fusion_method!r}; expected one of "
                              f"{', '.join(FUSION_METHODS)}")
        if self.loop.steps is None and self.loop.budget_minutes is None:
            raise MixretError("give the schedule's length: steps or budget_minutes")
        self.model.validate()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"], d["loop"] = self.model.to_dict(), dataclasses.asdict(self.loop)
        return d


# Options a resumed run must keep (the rest may change between invocations).
RUN_IDENTITY = ("pairs", "query_field", "target_field", "test_fraction", "val_pairs", "init", "model", "pooling",
                "pool_head", "tokenizer",
                "vocab_size", "max_length", "batch_size", "temperature", "learn_temperature", "symmetric",
                "hard_negatives", "token_dropout", "seed")


# --- data ---------------------------------------------------------------------------------------

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


def validation_slice(pairs, n: int) -> tuple[list, list]:
    """(train, validation): the n pairs with the smallest hash of "val:" + id are the validation slice; the
    choice depends on the ids alone (not on order), each side keeps input order."""
    if n < 2 or len(pairs) < n + 2:
        raise MixretError(f"{len(pairs)} training pairs are too few for a validation slice of {n} and training; "
                          f"expected at least 12 pairs")
    keys = [hashlib.blake2b(f"val:{p.id}".encode(), digest_size=8).digest() for p in pairs]
    chosen = set(sorted(range(len(pairs)), key=keys.__getitem__)[:n])
    return ([p for i, p in enumerate(pairs) if i not in chosen], [p for i, p in enumerate(pairs) if i in chosen])


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's batches [n_batches, batch_size] of pair indices (the remainder is dropped), grouped by length:
    a seeded permutation, sorted by length within chunks of LENGTH_CHUNK batches, the batches then shuffled."""
    n = len(lengths) // batch_size * batch_size
    if n == 0:
        raise MixretError(f"{len(lengths)} training pairs cannot fill one batch of {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))[:n]
    chunk = batch_size * LENGTH_CHUNK
    for s in range(0, n, chunk):
        part = perm[s:s + chunk]
        perm[s:s + chunk] = part[np.argsort(lengths[part], kind="stable")]
    batches = perm.reshape(-1, batch_size)
    return batches[rng.permutation(len(batches))]


def drop_tokens(seq: list[int], p: float, rng: np.random.Generator, keep_last: bool) -> list[int]:
    """`seq` without a random fraction p of its tokens; the first ([bos]) stays, and the last when keep_last (an
    appended [eos]); at least one other token stays."""
    if p == 0.0:
        return seq
    end = len(seq) - keep_last
    inner = [t for t, keep in zip(seq[1:end], rng.random(end - 1) >= p) if keep]
    return [seq[0]] + (inner or seq[1:2]) + seq[end:]


def bm25_hard_negatives(documents: list[str], queries: list[str], depth: int = 10) -> np.ndarray:
    """For each query i, the document BM25 ranks highest among those that are not document i -> [N] indices
    (a random other document when BM25 finds none)."""
    _, top = BM25Index(documents).search(queries, min(depth, len(documents)))
    rng = np.random.default_rng(0)
    out = np.empty(len(queries), dtype=np.int64)
    for i, row in enumerate(top):
        others = row[row != i]
        out[i] = others[0] if len(others) else (i + 1 + rng.integers(len(documents) - 1)) % len(documents)
    return out


# --- the objective ------------------------------------------------------------------------------

class BiEncoder(nn.Module):
    """A language model as a bi-encoder, with the InfoNCE loss and its temperature (fixed or learned)."""

    def __init__(self, lm: nn.Module, pooling: str, temperature: float, learn_temperature: bool,
                 symmetric: bool = True):
        super().__init__()
        self.lm, self.pooling, self.symmetric = lm, pooling, symmetric
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_scale.detach()))

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, D], unit norm
        return F.normalize(pool(self.lm, ids, mask, self.pooling), dim=-1)

    def forward(self, batch) -> tuple[torch.Tensor, int]:
        """batch = (query ids, query mask [B, Lq], document ids, document mask [B + H, Ld], excluded [B, B + H])
        where document i is query i's gold, the H after them hard negatives, and excluded marks documents that
        are not negatives of a query -> (summed loss over the B queries, B)."""
        q_ids, q_mask, d_ids, d_mask, excluded = batch
        q, d = self.embed(q_ids, q_mask), self.embed(d_ids, d_mask)           # [B, D], [B + H, D]
        logits = self.log_scale.clamp(max=math.log(100.0)).exp() * q @ d.T     # [B, B + H]
        logits = logits.masked_fill(excluded, float("-inf"))
        gold = torch.arange(len(q), device=q.device)
        loss = F.cross_entropy(logits, gold, reduction="sum")
        if self.symmetric:
            loss = (loss + F.cross_entropy(logits[:, :len(q)].T, gold, reduction="sum")) / 2
        return loss, len(q)


def mean_pairwise_cosine(e: torch.Tensor) -> float:
    """Mean cosine over the distinct pairs of rows of unit-norm e [N, D]: near 1 when every text gets about the
    same embedding (collapsed), near 0 for embeddings spread over the sphere."""
    n = len(e)
    total = e.sum(dim=0)
    return float((total @ total - (e * e).sum()) / (n * (n - 1)))


@torch.no_grad()
def rank_metrics(q: torch.Tensor, d: torch.Tensor) -> dict:
    """Query i's gold is document i; unit-norm q [N, D], d [N, D] -> R@1 and MRR@10 by cosine (ties lose)."""
    scores = q @ d.T
    ranks = (scores >= scores.diagonal().unsqueeze(1)).sum(1).double().numpy()   # pessimistic: ties rank first
    return {"val_r1": round(float((ranks == 1).mean()), 5), "val_mrr10": round(mrr_at(ranks, 10), 5)}


def fit_fusion(q: np.ndarray, d: np.ndarray, val: list, bm25_params: BM25Params, method: str,
               source: str) -> tuple[Fusion, float]:
    """The fusion weight fitted on the validation pairs `val` (their query and document embeddings q, d [N, E],
    unit norm) with the fitted BM25 -> (the Fusion, its validation R@1)."""
    depth = Fusion(method=method).depth
    retriever = Retriever(d, [p.target for p in val], bm25_params=bm25_params)
    cands, dense, lexical = retriever.fusion_candidates(q, [p.query for p in val], depth)
    weight, record = fit_weight(dense, lexical, cands, np.arange(len(val)), method)
    fusion = Fusion(weight=weight, method=method, depth=depth,
                    fitted={"on": f"{len(val)} validation pairs of {source} (not test pairs)", **record})
    return fusion, record["r@1"][record["grid"].index(weight)]


def finetune_config(options: dict, config_file: str | os.PathLike | None = None) -> FinetuneConfig:
    """FinetuneConfig from, lowest priority first: the defaults, the options saved by the run being resumed (`resume`
    with an `out` holding train_config.json), a JSON config file of options, and `options` (the flags given), all by
    option name (`layers`, `model`, `lr`, ... as the command's flags)."""
    given = read_options_file(config_file) if config_file is not None else {}
    given.update(options)
    cfg = FinetuneConfig()
    saved_path = Path(given["out"]) / loop.TRAIN_CONFIG_NAME if given.get("out") else None
    if given.get("resume") and saved_path is not None and saved_path.is_file():
        saved = io.read_json(saved_path, "run options")
        fields = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"model", "loop", "resume", "overwrite"}
        loop_fields = {f.name for f in dataclasses.fields(LoopConfig)} - {"stop_after", "progress"}
        # the loop's options, with the schedule as resolved when the run started (a budget became steps)
        saved_loop = {**saved.get("loop", {}), **{k: saved[k] for k in ("steps", "warmup", "lr") if k in saved},
                      "budget_minutes": None}
        cfg = FinetuneConfig(**{k: v for k, v in saved.items() if k in fields},
                             model=ModelConfig(**saved["model"]),
                             loop=dataclasses.replace(cfg.loop, **{k: v for k, v in saved_loop.items()
                                                                   if k in loop_fields}))
    model_given = sorted(set(given) & set(option_fields(ModelConfig)) - {"arch"})
    init = given.get("model", cfg.init)
    if init not in ARCHS and model_given and not given.get("resume"):
        raise MixretError(f"model options ({', '.join(model_given)}) apply to a new model; {init} is a model "
                          f"folder: its own options stay")
    if "budget_minutes" in given and "steps" not in given:
        given["steps"] = None   # the budget sets the length
    return replace_options(cfg, given, str(config_file or "options"))


# --- the task -----------------------------------------------------------------------------------

def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune as `cfg` says -> the output folder (mixret.load reads it), or the checkpoint written when
    `loop.stop_after` ended the run early. Raises MixretError for bad options or input (before anything is
    written) and mixret.training.loop.Interrupted after SIGINT/SIGTERM (with a checkpoint)."""
    cfg.validate()
    with Distributed.from_env() as dist:
        task = FinetuneTask(cfg, dist)
        out = loop.train(task, cfg.loop, dist, task.out, task.mode, seed=cfg.seed)
        if out == task.out:
            final = {k: v for k, v in task.last_metrics.items() if k.startswith("val_")}
            task.say(f"done: {cfg.loop.steps} steps; validation " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in
                                                                               final.items())
                     + f"; fusion weight {task.fusion.weight:.2f} ({task.fusion.method}); "
                     + f"BM25 {task.bm25_params.describe()}")
        return out


class FinetuneTask(Task):
    """What fine-tuning gives the loop: pairs, tokenizer and model, batches by step, the InfoNCE loss, and
    validation R@1 / MRR@10 (with the fusion weight fitted at each evaluation, BM25's parameters at the first)."""
    name = "finetune"
    unit = "queries"
    metric_keys = ("val_r1", "val_mrr10", "val_fusion_r1", "fusion_weight", "val_mean_cos")
    files = (io.CONFIG_NAME, io.WEIGHTS_NAME, io.TOKENIZER_NAME, FUSION_NAME, BM25_NAME)

    def __init__(self, cfg: FinetuneConfig, dist: Distributed):
        self.cfg, self.dist = cfg, dist
        start = Path(cfg.init)
        self.from_folder = cfg.init not in ARCHS
        if self.from_folder and not (start / io.CONFIG_NAME).is_file():
            raise MixretError(f"{start}: not a model folder (no {io.CONFIG_NAME}), nor an architecture; expected "
                              f"a folder from `mixret pretrain`/`mixret finetune` or one of {', '.join(ARCHS)}")
        if cfg.out is None:
            cfg.out = f"runs/{start.resolve().name if self.from_folder else cfg.init}-ft"
        self.out = Path(cfg.out)
        if self.from_folder and self.out.resolve() == start.resolve():
            raise MixretError(f"{self.out}: the output folder is the model being fine-tuned; choose another --out")
        options = cfg.to_dict()
        self.mode = dist.broadcast_text(dist.on_main(lambda: loop.inspect_run_dir(
            self.out, options, RUN_IDENTITY, cfg.resume, cfg.overwrite, self.files, "mixret finetune",
            replaces="clm")) or "")
        if cfg.resume and self.mode == "fresh":
            self.say(f"{self.out}: no run to resume there; starting a new one")
        self.load_pairs()
        self.build_model()
        max_length = min(cfg.max_length or self.lm.config.context, self.lm.config.context)
        self.max_length = max_length
        pooling = cfg.pooling
        self.lm.embedding_defaults = {"pooling": pooling, "max_length": max_length}
        self.keep_last = pooling == "eos"
        tokenize = lambda texts: token_sequences(self.tokenizer, texts, max_length, pooling)  # noqa: E731
        (self.q_seqs, tq), (self.d_seqs, td) = tokenize([p.query for p in self.train]), \
            tokenize([p.target for p in self.train])
        (self.val_q, _), (self.val_d, _) = tokenize([p.query for p in self.val]), tokenize([p.target for p in self.val])
        self.truncated = tq + td
        self.doc_lengths = np.array([len(s) for s in self.d_seqs])
        self.per_epoch = len(self.train) // (cfg.batch_size * cfg.loop.grad_accum * dist.world_size)
        if self.per_epoch == 0:
            raise MixretError(f"{len(self.train)} training pairs cannot fill one step of "
                              f"{cfg.batch_size * cfg.loop.grad_accum * dist.world_size} pairs; expected more pairs "
                              f"or a smaller batch_size")
        self.hard = None
        if cfg.hard_negatives == "bm25":
            self.say("mining BM25 hard negatives among the training documents")
            self.hard = bm25_hard_negatives([p.target for p in self.train], [p.query for p in self.train])
            # batches are grouped by the longer of each pair's two documents: both are padded together
            self.doc_lengths = np.maximum(self.doc_lengths, self.doc_lengths[self.hard])
        self.objective = BiEncoder(self.lm, pooling, cfg.temperature, cfg.learn_temperature, cfg.symmetric)
        self.objective.to(dist.device)
        self.fusion = Fusion(method=cfg.fusion_method)
        self.last_metrics: dict = {}
        self.curve_reference = (math.log(cfg.batch_size), f"chance (ln {cfg.batch_size}): collapsed embeddings")
        self.describe()

    def say(self, message: str) -> None:
        loop.say(self.dist, message)

    def load_pairs(self) -> None:
        cfg = self.cfg
        path = Path(cfg.pairs) if cfg.pairs is not None else bundled_pairs_path()
        pairs = load_pairs(path, cfg.query_field, cfg.target_field)
        self.pairs_hash = io.file_hash(path)
        train, test = split_pairs(pairs, cfg.test_fraction)
        self.n_test = len(test)
        train, self.n_dropped = distinct_pairs(train)
        self.train, self.val = validation_slice(train, min(cfg.val_pairs, len(train) // 5))
        h = hashlib.blake2b(digest_size=16)
        for p in self.train + self.val:
            h.update(f"{p.id}\0{p.query}\0{p.target}\0".encode())
        self.fingerprint = h.hexdigest()
        self.source = str(path)

    def build_model(self) -> None:
        cfg = self.cfg
        if self.from_folder:
            lm = load(cfg.init)
            if lm.tokenizer is None:
                raise MixretError(f"{cfg.init}: the model folder has no {io.TOKENIZER_NAME}")
            self.tokenizer = lm.tokenizer
        else:
            saved = self.out / io.TOKENIZER_NAME
            if self.mode == "resume" and saved.is_file():
                self.tokenizer = load_tokenizer(saved)
            else:
                self.tokenizer = make_tokenizer(cfg.tokenizer, cfg.vocab_size,
                                                lambda: [t for p in self.train + self.val for t in (p.query, p.target)],
                                                self.say, "the training pairs")
            torch.manual_seed(cfg.seed)
            lm = build_model(dataclasses.replace(cfg.model, arch=cfg.init, vocab_size=self.tokenizer.vocab_size))
            lm.tokenizer = self.tokenizer
        if cfg.pool_head and lm.needs_pool_head(cfg.pooling):
            lm.add_pool_head()
        lm.trained_on = (lm.trained_on or []) + sources_record([self.source], self.cfg.test_fraction or None)
        lm.freeze_lm_head()
        self.lm = lm.to(self.dist.device)
        self.lm.train()

    # -- what the loop asks for ----------------------------------------------------------------------
    def batches(self, start: int, dist: Distributed, grad_accum: int) -> Iterator[list]:
        """This rank's micro-batches of each step: step s takes the (s % per_epoch)-th group of
        batch_size * grad_accum * world_size pairs of epoch s // per_epoch; micro-batch k of rank r is its
        (k * world_size + r)-th slice of batch_size."""
        B, pad = self.cfg.batch_size, self.tokenizer.pad_id
        group = B * grad_accum * dist.world_size
        epoch_cache: dict[int, np.ndarray] = {}
        for step in range(start, 2**62):
            epoch, i = divmod(step, self.per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = epoch_batches(self.doc_lengths, B, self.cfg.seed, epoch).reshape(-1)
            rows = epoch_cache[epoch][i * group:(i + 1) * group]
            micro = []
            for k in range(grad_accum):
                part = rows[(k * dist.world_size + dist.rank) * B:][:B]
                rng = np.random.default_rng([self.cfg.seed, step, k, dist.rank])   # the same on a resume
                micro.append(self.micro_batch(part, pad, dist.device, rng))
            yield micro

    def relative_cost(self, step: int) -> float:
        """Padded tokens of step `step` (queries and documents, before token dropout, over every rank's
        micro-batches) against the mean step of an epoch: what the budget timing scales by."""
        epoch, i = divmod(step, self.per_epoch)
        batches = epoch_batches(self.doc_lengths, self.cfg.batch_size, self.cfg.seed, epoch).reshape(-1)
        return self._step_tokens(batches, i) / self._mean_step_tokens

    @functools.cached_property
    def _mean_step_tokens(self) -> float:
        first = epoch_batches(self.doc_lengths, self.cfg.batch_size, self.cfg.seed, 0).reshape(-1)
        return float(np.mean([self._step_tokens(first, j) for j in range(self.per_epoch)]))

    @functools.cached_property
    def _text_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Token counts of the training queries and documents."""
        return np.array([len(s) for s in self.q_seqs]), np.array([len(s) for s in self.d_seqs])

    def _step_tokens(self, batches: np.ndarray, i: int) -> float:
        """Padded tokens of the i-th step's group of rows in one epoch's batches (flattened)."""
        B = self.cfg.batch_size
        group = B * self.cfg.loop.grad_accum * self.dist.world_size
        q_len, d_len = self._text_lengths
        rows = batches[i * group:(i + 1) * group]
        total = 0.0
        for part in (rows[k:k + B] for k in range(0, len(rows), B)):
            docs = part if self.hard is None else np.concatenate([part, self.hard[part]])
            total += len(part) * q_len[part].max() + len(docs) * d_len[docs].max()
        return total

    def micro_batch(self, rows: np.ndarray, pad: int, device: torch.device, rng: np.random.Generator) -> tuple:
        view = lambda seqs, idx: [drop_tokens(seqs[i], self.cfg.token_dropout, rng, self.keep_last)  # noqa: E731
                                  for i in idx]
        q_ids, q_mask = pad_sequences(view(self.q_seqs, rows), pad)
        docs = list(rows) if self.hard is None else list(rows) + list(self.hard[rows])
        d_ids, d_mask = pad_sequences(view(self.d_seqs, docs), pad)
        excluded = torch.zeros(len(rows), len(docs), dtype=torch.bool)
        if self.hard is not None:                # another query's gold brought as a hard negative
            excluded[:, len(rows):] = torch.from_numpy(self.hard[rows][None, :] == rows[:, None])
        return tuple(t.to(device) for t in (q_ids, q_mask, d_ids, d_mask, excluded))

    @functools.cached_property
    def bm25_params(self) -> BM25Params:
        """BM25's k1, b and stemmer fitted on the validation pairs (they do not depend on the model: fitted once)."""
        return fit_bm25([p.query for p in self.val], [p.target for p in self.val],
                        on=f"{len(self.val)} validation pairs of {self.source}",
                        trained_on=sources_record([self.source], self.cfg.test_fraction or None))

    def evaluate(self) -> dict:
        """Validation R@1 / MRR@10 (each validation query against all validation documents), then the fusion
        weight fitted on the same pairs, with the fitted BM25, and the fused R@1 it reaches there."""
        B, device, pad = 64, self.dist.device, self.tokenizer.pad_id
        q = F.normalize(embed_sequences(self.lm, self.val_q, B, self.objective.pooling, pad, device), dim=-1)
        d = F.normalize(embed_sequences(self.lm, self.val_d, B, self.objective.pooling, pad, device), dim=-1)
        metrics = rank_metrics(q, d)
        metrics["val_mean_cos"] = round(mean_pairwise_cosine(torch.cat([q, d])), 4)
        self.fusion, fused_r1 = fit_fusion(q.numpy(), d.numpy(), self.val, self.bm25_params, self.fusion.method,
                                           self.source)
        metrics.update(val_fusion_r1=fused_r1, fusion_weight=self.fusion.weight)
        if self.cfg.learn_temperature:
            metrics["temperature"] = round(self.objective.temperature, 5)
        self.last_metrics = metrics
        return metrics

    def options(self) -> dict:
        return {k: v for k, v in self.cfg.to_dict().items() if k not in ("resume", "overwrite")} | {
            "pairs_hash": self.pairs_hash, "budget_minutes": self.cfg.loop.budget_minutes, "lr": self.cfg.loop.lr}

    def prepare(self, directory: Path) -> None:
        self.tokenizer.save(directory / io.TOKENIZER_NAME)

    def save(self, directory: Path) -> None:
        self.lm.save_pretrained(directory, self.tokenizer)
        io.write_json(Path(directory) / FUSION_NAME, self.fusion.to_dict())
        save_bm25(directory, self.bm25_params)
        if self.cfg.learn_temperature:
            io.write_json(Path(directory) / "temperature.json", {"temperature": self.objective.temperature})

    def load(self, directory: Path) -> None:
        io.load_weights(self.lm, directory)
        if (Path(directory) / FUSION_NAME).is_file():
            self.fusion = Fusion.from_dict(io.read_json(Path(directory) / FUSION_NAME), str(directory))
        if self.cfg.learn_temperature and (Path(directory) / "temperature.json").is_file():
            t = io.read_json(Path(directory) / "temperature.json")["temperature"]
            with torch.no_grad():
                self.objective.log_scale.fill_(math.log(1.0 / t))

    def start_metrics(self) -> dict:
        """The loss of step 0's batch before any step, chance (ln of the batch), and how spread the validation
        embeddings are (`mean_pairwise_cosine`): a loss above chance with a mean cosine near 1 starts a collapse."""
        (batch,) = next(self.batches(0, self.dist, 1))
        loss, n = self.objective(batch)
        pad, device, pooling = self.tokenizer.pad_id, self.dist.device, self.objective.pooling
        e = torch.cat([embed_sequences(self.lm, seqs[:256], 64, pooling, pad, device) for seqs in (self.val_q,
                                                                                                   self.val_d)])
        return {"loss": round(float(loss) / n, 5), "chance": round(math.log(n), 5),
                "val_mean_cos": round(mean_pairwise_cosine(F.normalize(e, dim=-1)), 4)}

    def describe(self) -> None:
        cfg, lm = self.cfg, self.lm
        start = f"from {cfg.init}" if self.from_folder else f"from random init (mixing_init {lm.config.mixing_init})"
        length = (f"{cfg.loop.steps:,} steps" if cfg.loop.steps is not None
                  else f"{cfg.loop.budget_minutes:g} minutes of steps")
        hard = ", one BM25 hard negative each" if self.hard is not None else ""
        self.say(
            f"pairs: {self.source}: {len(self.train):,} for training, {len(self.val):,} for validation, "
            f"{self.n_test:,} held out as the test split"
            + (f"; {self.n_dropped:,} dropped (repeated query or document text)" if self.n_dropped else "") + "\n"
            f"model: {lm.config.arch} {start}, {lm.num_params():,} parameters (d_model {lm.config.d_model}, "
            f"{lm.config.n_layers} layers, context {lm.config.context}); pooling {cfg.pooling}"
            f"{' through the embedding head' if lm.pool_head is not None and cfg.pooling != 'mean' else ''}, "
            f"max_length {self.max_length}"
            + (f"; {self.truncated:,} texts truncated" if self.truncated else "") + "\n"
            f"training: {length} of {cfg.batch_size} pairs{hard}, temperature {cfg.temperature:g}"
            f"{' (learned)' if cfg.learn_temperature else ''}, lr {cfg.loop.lr:g}, "
            f"token dropout {cfg.token_dropout:g}\n"
            f"output: {self.out}")
