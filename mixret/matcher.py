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

Duplicates: `train_matcher` refuses repeated query embeddings (`dedupe_queries` drops them and says
how many); identical target embeddings are treated as one target, so a candidate set never holds
the true target twice nor a copy of it as a negative.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixret import io
from mixret.data import drop_repeated_queries  # noqa: F401  (mixret.matcher.drop_repeated_queries)
from mixret.errors import MixretError

HARD_POOL_FACTOR = 4  # hard negatives are drawn each step from this many times K nearest targets


@dataclass
class MatcherConfig:
    emb_dim: int                # size of the query and target embeddings
    d_model: int = 256
    n_layers: int = 4
    context: int = 32           # slots: 1 query + context-1 candidates
    ff_mult: int = 4            # feed-forward expansion: Linear(d, ff_mult*d) GELU Linear(ff_mult*d, d)
    dropout: float = 0.0
    query_product: bool = True  # feed each candidate slot proj(c * q) as well as proj(c)
    embedder: str | None = None  # file hash of the LM that produced the embeddings, when known
    pooling: str | None = None   # how those embeddings were pooled (mixret.embed.EmbeddingSpec), when known
    max_length: int | None = None  # and how many tokens of each text they kept
    trained_on: list | None = None  # the pairs file(s) that trained it (mixret.data.sources_record)

    def __post_init__(self):
        for name in ("emb_dim", "d_model", "n_layers", "ff_mult"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise MixretError(f"matcher {name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.context, int) or self.context < 3:
            raise MixretError(f"matcher context must be an integer >= 3 (query + 2 candidates), "
                              f"got {self.context!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MixretError(f"matcher dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def n_candidates(self) -> int:
        return self.context - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "MatcherConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise MixretError(f"{source}: unknown matcher option(s) {unknown}")
        if "emb_dim" not in d:
            raise MixretError(f"{source}: matcher config has no emb_dim")
        return cls(**d)


# -- model ------------------------------------------------------------------------------------

class TokenMix(nn.Module):
    """A learned (context x context) matrix plus bias along the slot axis; no mask.

    Starts at zero: slots are exchangeable, so a random start would only add position-specific
    noise that training has no reason to remove.
    """

    def __init__(self, context: int):
        super().__init__()
        self.mix = nn.Linear(context, context)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, D] -> [B, C, D]
        return self.mix(x.transpose(1, 2)).transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, cfg: MatcherConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.ff_mult * cfg.d_model)
        self.down = nn.Linear(cfg.ff_mult * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MixerBlock(nn.Module):
    """Pre-norm: x + TokenMix(LN(x)), then x + FF(LN(x))."""

    def __init__(self, cfg: MatcherConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.tokens = TokenMix(cfg.context)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, D]
        x = x + self.drop(self.tokens(self.ln1(x)))
        return x + self.drop(self.ff(self.ln2(x)))


class Matcher(nn.Module):
    def __init__(self, config: MatcherConfig):
        super().__init__()
        self.config = config
        E, D = config.emb_dim, config.d_model
        # standardisation of the inputs, fitted on the training split by `fit_standardization`
        self.register_buffer("query_mean", torch.zeros(E))
        self.register_buffer("query_std", torch.ones(E))
        self.register_buffer("target_mean", torch.zeros(E))
        self.register_buffer("target_std", torch.ones(E))
        self.query_in = nn.Linear(E, D)
        self.cand_in = nn.Linear(E, D)
        if config.query_product:
            self.query_map = nn.Linear(E, E, bias=False)  # starts as the identity: c * q
            nn.init.eye_(self.query_map.weight)
            self.prod_in = nn.Linear(E, D)
        self.blocks = nn.ModuleList([MixerBlock(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, 1)

    @torch.no_grad()
    def fit_standardization(self, queries: torch.Tensor, targets: torch.Tensor) -> None:
        """Set the per-dimension mean and std of queries [Q, E] and targets [T, E]."""
        for name, x in (("query", queries), ("target", targets)):
            x = x.to(self.query_mean.device, torch.float64)
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0, correction=0).clamp_min(1e-6))

    def standardize(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """[..., E] raw embeddings -> standardised float32, with `side` 'query' or 'target'."""
        x = x.to(self.query_mean.device, torch.float32)
        return (x - getattr(self, f"{side}_mean")) / getattr(self, f"{side}_std")

    def forward(self, query: torch.Tensor, candidates: torch.Tensor,
                candidate_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query [B, E], candidates [B, N, E] (N <= context-1), candidate_mask [B, N] bool
        (False = absent) -> logits [B, N]; absent slots get -inf and are seen as padding."""
        B, N = self._check_inputs(query, candidates, candidate_mask)
        q = self.standardize(query, "query")            # [B, E]
        c = self.standardize(candidates, "target")      # [B, N, E]
        slots = self.cand_in(c)                         # [B, N, D]
        if self.config.query_product:
            slots = slots + self.prod_in(c * self.query_map(q)[:, None, :])
        if candidate_mask is not None:
            slots = slots.masked_fill(~candidate_mask[..., None], 0.0)  # absent = padding, whatever it holds
        slots = F.pad(slots, (0, 0, 0, self.config.n_candidates - N))     # [B, C-1, D]
        x = torch.cat([self.query_in(q)[:, None, :], slots], dim=1)      # [B, C, D]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x[:, 1:N + 1])).squeeze(-1)         # [B, N]
        if candidate_mask is not None:
            logits = logits.masked_fill(~candidate_mask, float("-inf"))
        return logits

    def _check_inputs(self, query, candidates, candidate_mask) -> tuple[int, int]:
        E = self.config.emb_dim
        if query.ndim != 2 or candidates.ndim != 3:
            raise MixretError(f"matcher expects query [B, E] and candidates [B, N, E], got shapes "
                              f"{tuple(query.shape)} and {tuple(candidates.shape)}")
        B, N, Ec = candidates.shape
        if query.shape[1] != E or Ec != E:
            raise MixretError(f"matcher was trained on {E}-dim embeddings, got query dim {query.shape[1]} "
                              f"and candidate dim {Ec} (embed with the same model the matcher was trained on)")
        if query.shape[0] != B:
            raise MixretError(f"matcher got {query.shape[0]} queries but {B} candidate sets")
        if not 1 <= N <= self.config.n_candidates:
            raise MixretError(f"matcher takes 1 to {self.config.n_candidates} candidates per query "
                              f"(context {self.config.context}), got {N}")
        if candidate_mask is not None and (candidate_mask.shape != (B, N) or candidate_mask.dtype != torch.bool):
            raise MixretError(f"candidate_mask must be a bool tensor of shape {(B, N)}, "
                              f"got {candidate_mask.dtype} {tuple(candidate_mask.shape)}")
        return B, N

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- save / load ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write model.safetensors (weights + standardisation buffers), then config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        io.save_weights(self, directory)
        from mixret import __version__
        io.write_json(directory / io.CONFIG_NAME,
                      {"kind": "matcher", "mixret_version": __version__, **self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Matcher":
        directory = Path(directory)
        if not directory.is_dir():
            raise MixretError(f"{directory}: matcher directory not found")
        cfg_path = directory / io.CONFIG_NAME
        raw = io.read_json(cfg_path, "matcher config")
        kind = raw.pop("kind", None)
        raw.pop("mixret_version", None)
        if kind != "matcher":
            hint = " (a language model: load it with mixret.load)" if kind == "clm" else ""
            raise MixretError(f"{cfg_path}: not a mixret matcher (kind={kind!r}, expected 'matcher'){hint}")
        matcher = cls(MatcherConfig.from_dict(raw, source=str(cfg_path)))
        io.load_weights(matcher, directory)
        matcher.eval()
        return matcher


@torch.no_grad()
def score_candidates(matcher: Matcher, query_emb, cand_embs, batch_size: int = 1024,
                     candidate_mask=None) -> np.ndarray:
    """Matcher logits for query_emb [Q, E] against cand_embs [Q, N, E] -> np.ndarray [Q, N] float32.

    Arrays or tensors; batched, without gradients, in eval mode (the matcher's mode is restored
    afterwards). candidate_mask [Q, N] bool marks present candidates; absent ones score -inf.
    """
    q, c = torch.as_tensor(query_emb).float(), torch.as_tensor(cand_embs).float()
    if q.ndim != 2 or c.ndim != 3 or c.shape[0] != q.shape[0]:
        raise MixretError(f"score_candidates expects query_emb [Q, E] and cand_embs [Q, N, E], "
                          f"got {tuple(q.shape)} and {tuple(c.shape)}")
    mask = None if candidate_mask is None else torch.as_tensor(candidate_mask)
    device = next(matcher.parameters()).device
    was_training = matcher.training
    matcher.eval()
    try:
        out = [matcher(q[i:i + batch_size].to(device), c[i:i + batch_size].to(device),
                       None if mask is None else mask[i:i + batch_size].to(device)).float().cpu()
               for i in range(0, len(q), batch_size)]
    finally:
        matcher.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(tuple(c.shape[:2]), np.float32)


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
    W = n_slots  # window: enough that n_rand survive removing the true target and K hard ones
    perm = torch.randperm(n_targets, generator=generator)
    start = torch.randint(0, n_targets, (B, 1), generator=generator)
    window = perm[(start + torch.arange(W)) % n_targets]                           # [B, W]
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


# -- input checks -----------------------------------------------------------------------------

@dataclass
class PairSet:
    """Aligned (query, target) embeddings with identical targets merged."""
    queries: torch.Tensor     # [Q, E]
    targets: torch.Tensor     # [T, E] distinct target embeddings
    true_index: torch.Tensor  # [Q] row of each query's target in `targets`


def as_pair_set(queries, targets, name: str, context: int) -> PairSet:
    """Validate aligned query/target embedding arrays and merge identical targets."""
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
                          "have one target (drop them first, e.g. with mixret.matcher.dedupe_queries)")
    uniq, inverse = torch.unique(t, dim=0, return_inverse=True)
    if uniq.shape[0] < context - 1:
        raise MixretError(f"{name}: {uniq.shape[0]} distinct targets, but context {context} needs at least "
                          f"{context - 1} (one true target and {context - 2} negatives); "
                          "use more pairs or a smaller context")
    return PairSet(q, uniq, inverse)


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
    by `mixret embed`, matched to the pairs by id, which must have been made alike (mixret.embed.EmbeddingSpec:
    same model, pooling and max_length; a given pooling must agree with theirs).
    """
    from mixret.embed import EmbeddingSpec, encode, resolve_spec
    if model is not None and (query_emb is None and target_emb is None):
        from mixret.models import load
        spec = resolve_spec(model, pooling)
        lm = load(model)
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
    from mixret.embed import load_emb_dir
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

@torch.no_grad()
def evaluate(matcher: Matcher, pairs: PairSet, sets: torch.Tensor, positions: torch.Tensor,
             batch_size: int = 512) -> dict:
    """Cross-entropy, top-1 accuracy and MRR of the matcher on fixed candidate sets [Q, N]."""
    logits = torch.cat([
        torch.from_numpy(score_candidates(matcher, pairs.queries[i:i + batch_size],
                                          pairs.targets[sets[i:i + batch_size]], batch_size))
        for i in range(0, len(sets), batch_size)])                                # [Q, N]
    return _set_metrics(logits, positions, with_ce=True)


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
    return _set_metrics(scores, positions, with_ce=False)


def _set_metrics(scores: torch.Tensor, positions: torch.Tensor, with_ce: bool) -> dict:
    true = scores.gather(1, positions[:, None])
    rank = (scores > true).sum(1) + 1  # ties count in the true target's favour
    out = {"top1": (rank == 1).float().mean().item(), "mrr": (1.0 / rank.float()).mean().item()}
    if with_ce:
        out = {"ce": F.cross_entropy(scores, positions).item(), **out}
    return out


# -- training ---------------------------------------------------------------------------------

def train_matcher(train_q, train_t, test_q, test_t, config: MatcherConfig, epochs: int = 10,
                  batch_size: int = 256, lr: float = 1e-3, seed: int = 0, hard_negatives: int = 0,
                  out_dir: str | os.PathLike | None = None, progress: bool = True,
                  device: str | None = None) -> tuple[Matcher, dict]:
    """Train a matcher on aligned (query, target) embeddings -> (matcher in eval mode, metrics).

    Each step every query gets a fresh set of context-1 distinct candidates: its target plus
    context-2 negatives from the other training targets (`hard_negatives` of them drawn from the
    query's nearest targets), shuffled. Evaluation uses fixed sets built from `seed`. With out_dir,
    writes the matcher, metrics.jsonl (one line per epoch) and metrics.json into a temporary
    folder that replaces out_dir when training has finished.
    """
    C = config.context
    train = as_pair_set(train_q, train_t, "train split", C)
    test = as_pair_set(test_q, test_t, "test split", C)
    if train.queries.shape[1] != config.emb_dim or test.queries.shape[1] != config.emb_dim:
        raise MixretError(f"matcher config has emb_dim {config.emb_dim} but the embeddings have dim "
                          f"{train.queries.shape[1]} (train) and {test.queries.shape[1]} (test)")
    if not 0 <= hard_negatives <= C - 2:
        raise MixretError(f"hard_negatives must be between 0 and context-2 = {C - 2}, got {hard_negatives}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise MixretError(f"epochs and batch_size must be positive and lr > 0, got {epochs}, {batch_size}, {lr}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, hard_negatives=hard_negatives,
                progress=progress, device=device)
    if out_dir is None:
        return _fit(train, test, config, log_dir=None, **args)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = io.temp_dir(out_dir.parent, out_dir.name)
    try:
        matcher, metrics = _fit(train, test, config, log_dir=tmp_dir, **args)
        matcher.save_pretrained(tmp_dir)
        io.write_json(tmp_dir / "metrics.json", metrics)
        publish_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return matcher, metrics


def _fit(train: PairSet, test: PairSet, config: MatcherConfig, epochs: int, batch_size: int, lr: float,
         seed: int, hard_negatives: int, progress: bool, device: torch.device,
         log_dir: Path | None) -> tuple[Matcher, dict]:
    """The training loop of `train_matcher`, on validated inputs."""
    C = config.context
    torch.manual_seed(seed)
    matcher = Matcher(config).to(device)
    matcher.fit_standardization(train.queries, train.targets)

    # fixed evaluation sets: all of test, and a fixed subset of train of about the same size
    test_sets, test_pos = build_eval_sets(len(test.targets), C, seed, test.true_index)
    g = torch.Generator().manual_seed(seed)
    sub = torch.randperm(len(train.queries), generator=g)[:max(len(test.queries), 1024)].sort().values
    train_eval = PairSet(train.queries[sub], train.targets, train.true_index[sub])
    train_sets, train_pos = build_eval_sets(len(train.targets), C, seed + 1, train_eval.true_index)

    hard_pool = None
    if hard_negatives:
        size = min(HARD_POOL_FACTOR * hard_negatives, len(train.targets) - 1)
        hard_pool = hard_negative_pool(train.queries, train.targets, train.true_index, size,
                                       matcher.query_mean, matcher.target_mean)

    metrics = {
        "context": C, "n_candidates": C - 1,
        "chance_ce": math.log(C - 1), "chance_top1": 1.0 / (C - 1),
        "n_train": len(train.queries), "n_test": len(test.queries),
        "n_train_targets": len(train.targets), "n_test_targets": len(test.targets),
        "n_train_eval": len(train_eval.queries),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "hard_negatives": hard_negatives, "params": matcher.num_params(),
        "config": config.to_dict(),
        "test_cosine": cosine_baseline(test, test_sets, test_pos),
        "test_centered_cosine": cosine_baseline(test, test_sets, test_pos,
                                                matcher.query_mean, matcher.target_mean),
        "untrained_test": evaluate(matcher, test, test_sets, test_pos),
    }

    steps_per_epoch = math.ceil(len(train.queries) / batch_size)
    total = epochs * steps_per_epoch
    decay = [p for p in matcher.parameters() if p.ndim >= 2]      # matrices; not biases or norms
    rest = [p for p in matcher.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total))
    targets_dev = train.targets.to(device)
    log: list[dict] = []
    step_losses: list[float] = []

    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc="train-matcher", unit="step", disable=None if progress else True)
    for epoch in range(1, epochs + 1):
        matcher.train()
        order = torch.randperm(len(train.queries), generator=g)
        epoch_loss = 0.0
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]                                        # [B]
            sets, pos = sample_candidates(train.true_index[rows], len(train.targets), C - 1, g,
                                          hard_pool[rows] if hard_pool is not None else None,
                                          hard_negatives)                         # [B, C-1], [B]
            logits = matcher(train.queries[rows].to(device), targets_dev[sets.to(device)])  # [B, C-1]
            loss = F.cross_entropy(logits, pos.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(matcher.parameters(), 1.0)
            opt.step()
            sched.step()
            step_losses.append(loss.item())
            epoch_loss += step_losses[-1] * len(rows)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{step_losses[-1]:.3f}")
        matcher.eval()
        log.append({"epoch": epoch, "step": epoch * steps_per_epoch, "train_loss": epoch_loss / len(order),
                    "lr": sched.get_last_lr()[0], "test": evaluate(matcher, test, test_sets, test_pos)})
        if log_dir is not None:
            io.atomic_write_text(log_dir / "metrics.jsonl", "".join(json.dumps(e) + "\n" for e in log))
    bar.close()

    metrics.update({
        "test": log[-1]["test"],
        "train": evaluate(matcher, train_eval, train_sets, train_pos),
        "steps": total,
        "steps_to_leave_chance": steps_to_leave_chance(step_losses, math.log(C - 1)),
    })
    return matcher, metrics


def check_out_dir(out_dir: Path) -> None:
    """An output folder must be new, empty, or hold an earlier matcher (which gets replaced)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise MixretError(f"{out_dir}: exists and is not a directory; expected a matcher output folder")
    cfg = out_dir / io.CONFIG_NAME
    if any(out_dir.iterdir()) and (not cfg.is_file() or io.read_json(cfg).get("kind") != "matcher"):
        raise MixretError(f"{out_dir}: exists and does not hold a matcher; choose another output folder "
                          "or remove it")


def publish_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished output folder into place, replacing an earlier one, by renames."""
    if not out_dir.exists():
        os.replace(tmp_dir, out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
    os.replace(out_dir, old / "previous")
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old)


def warmup_cosine(total: int, warmup_frac: float = 0.05, floor: float = 0.1):
    """LR multiplier: linear warmup over warmup_frac of the steps, then cosine decay to `floor`."""
    warmup = max(1, int(warmup_frac * total))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def steps_to_leave_chance(losses: list[float], chance: float, window: int = 10, margin: float = 0.9) -> int | None:
    """First step at which the mean loss over the last `window` steps is below margin * chance."""
    for i in range(window, len(losses) + 1):
        if sum(losses[i - window:i]) / window < margin * chance:
            return i
    return None


def format_summary(metrics: dict) -> str:
    """A short table of test (and train) scores against chance and the cosine baselines."""
    rows = [
        ("matcher, test", metrics["test"]),
        ("matcher, train subset", metrics["train"]),
        ("untrained matcher, test", metrics["untrained_test"]),
        ("cosine, test", metrics["test_cosine"]),
        ("centred cosine, test", metrics["test_centered_cosine"]),
        ("chance", {"ce": metrics["chance_ce"], "top1": metrics["chance_top1"]}),
    ]
    lines = [f"{metrics['n_test']} test queries, {metrics['n_candidates']} candidates each "
             f"(context {metrics['context']})", f"{'':<26}{'CE':>8}{'top-1':>8}{'MRR':>8}"]
    for name, m in rows:
        cells = [f"{m[k]:8.3f}" if k in m else f"{'-':>8}" for k in ("ce", "top1", "mrr")]
        lines.append(f"{name:<26}" + "".join(cells))
    return "\n".join(lines)
