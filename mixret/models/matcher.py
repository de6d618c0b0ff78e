"""The matcher network: a bidirectional mixer that reads [query, candidates ...] embeddings and scores each
candidate (its training lives in `mixret.training.matcher`)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixret import io
from mixret.data import drop_repeated_queries  # noqa: F401  (mixret.data.drop_repeated_queries)
from mixret.errors import MixretError
from mixret.models.layers import FeedForward
from mixret.options import option

FEATURES = ("bm25", "cosine")  # per-candidate score features a matcher may take, in this order


@dataclass
class MatcherConfig:
    emb_dim: int = option(0, "Size of the query and target embeddings (set from them).", derived=True)
    d_model: int = option(256, "Matcher width.")
    n_layers: int = option(4, "Mixer blocks.", name="layers")
    context: int = option(32, "Matcher slots: the query and context-1 candidates.")
    ff_mult: int = option(4, "Feed-forward expansion: Linear(d, ff_mult*d) GELU Linear(ff_mult*d, d).")
    dropout: float = option(0.0, "Dropout rate.")
    query_product: bool = option(True, "Feed each candidate slot proj(c * q) as well as proj(c).")
    embedder: str | None = option(None, "File hash of the LM that produced the embeddings, when known.", derived=True)
    pooling: str | None = option(None, "How those embeddings were pooled (EmbeddingSpec), when known.", derived=True)
    max_length: int | None = option(None, "And how many tokens of each text they kept.", derived=True)
    trained_on: list | None = option(None, "The pairs file(s) that trained it (mixret.data.sources_record).",
                                     derived=True)
    features: list[str] = option(help="Per-candidate scores fed to each slot, comma-separated: bm25 (the "
                                      "candidate's BM25 score for the query), cosine (of the embeddings); none for "
                                      "neither. Each is z-scored within its set (docs/bench/matcher_features.md).",
                                 factory=list, split=",")

    def __post_init__(self):
        if isinstance(self.features, str) or not all(f in FEATURES for f in self.features) \
                or len(set(self.features)) != len(self.features):
            raise MixretError(f"matcher features must be distinct names among {', '.join(FEATURES)}, "
                              f"got {self.features!r}")
        self.features = [f for f in FEATURES if f in self.features]
        for name in ("d_model", "n_layers", "ff_mult"):
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

    @property
    def needs_bm25(self) -> bool:
        return "bm25" in self.features

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "MatcherConfig":
        return io.options_from_dict(cls, d, source, "matcher", required=("emb_dim",))


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


class MixerBlock(nn.Module):
    """Pre-norm: x + Dropout(TokenMix(LN(x))), then x + FF(LN(x))."""

    def __init__(self, cfg: MatcherConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.tokens = TokenMix(cfg.context)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.ff_mult, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, D]
        x = x + self.drop(self.tokens(self.ln1(x)))
        return x + self.ff(self.ln2(x))


class Matcher(nn.Module):
    def __init__(self, config: MatcherConfig):
        super().__init__()
        if not isinstance(config.emb_dim, int) or config.emb_dim < 1:
            raise MixretError(f"matcher emb_dim must be a positive integer, got {config.emb_dim!r}")
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
        if config.features:
            self.feat_in = nn.Linear(len(config.features), D)
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
                candidate_mask: torch.Tensor | None = None, bm25: torch.Tensor | None = None) -> torch.Tensor:
        """query [B, E], candidates [B, N, E] (N <= context-1), candidate_mask [B, N] bool
        (False = absent), bm25 [B, N] the candidates' BM25 scores for the query (needed when the
        features hold bm25, ignored otherwise) -> logits [B, N]; absent slots get -inf and are seen as padding."""
        B, N = self._check_inputs(query, candidates, candidate_mask, bm25)
        q = self.standardize(query, "query")            # [B, E]
        c = self.standardize(candidates, "target")      # [B, N, E]
        slots = self.cand_in(c)                         # [B, N, D]
        if self.config.query_product:
            slots = slots + self.prod_in(c * self.query_map(q)[:, None, :])
        if self.config.features:
            slots = slots + self.feat_in(self.slot_features(query, candidates, candidate_mask, bm25))
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

    def slot_features(self, query: torch.Tensor, candidates: torch.Tensor, candidate_mask: torch.Tensor | None,
                      bm25: torch.Tensor | None) -> torch.Tensor:
        """The config's features of each candidate, z-scored over the present candidates of its set -> [B, N, F]."""
        device = self.query_mean.device
        mask = (torch.ones(candidates.shape[:2], dtype=torch.bool, device=device) if candidate_mask is None
                else candidate_mask.to(device))                                        # [B, N]
        cols = []
        for name in self.config.features:
            if name == "bm25":
                s = bm25.to(device, torch.float32)                                    # [B, N]
            else:
                s = F.cosine_similarity(query.to(device, torch.float32)[:, None, :],
                                        candidates.to(device, torch.float32), dim=-1)  # [B, N]
            s = s.masked_fill(~mask, 0.0)
            n = mask.sum(1, keepdim=True).clamp_min(1)                               # [B, 1]
            mean = s.sum(1, keepdim=True) / n
            std = (((s - mean) ** 2).masked_fill(~mask, 0.0).sum(1, keepdim=True) / n).sqrt()
            cols.append(((s - mean) / std.clamp_min(1e-6)).masked_fill(~mask, 0.0))
        return torch.stack(cols, dim=-1)                                               # [B, N, F]

    def _check_inputs(self, query, candidates, candidate_mask, bm25) -> tuple[int, int]:
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
        if self.config.needs_bm25 and (bm25 is None or tuple(bm25.shape) != (B, N)):
            raise MixretError(f"this matcher takes each candidate's BM25 score for the query (features "
                              f"{self.config.features}): expected bm25 scores of shape {(B, N)}, got "
                              f"{None if bm25 is None else tuple(bm25.shape)} (search with the query texts)")
        return B, N

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- save / load ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write model.safetensors (weights + standardisation buffers), then config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        io.save_weights(self, directory)
        io.write_config(directory, "matcher", self.config.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Matcher":
        raw = io.read_config(directory, "matcher", "matcher", "matcher",
                             hints={"clm": " (a language model: load it with mixret.load)"})
        matcher = cls(MatcherConfig.from_dict(raw, source=str(Path(directory) / io.CONFIG_NAME)))
        io.load_weights(matcher, directory)
        matcher.eval()
        return matcher


@torch.no_grad()
def score_candidates(matcher: Matcher, query_emb, cand_embs, batch_size: int = 1024,
                     candidate_mask=None, bm25=None) -> np.ndarray:
    """Matcher logits for query_emb [Q, E] against cand_embs [Q, N, E] -> np.ndarray [Q, N] float32.

    Arrays or tensors; batched, without gradients, in eval mode (the matcher's mode is restored
    afterwards). candidate_mask [Q, N] bool marks present candidates; absent ones score -inf.
    bm25 [Q, N]: the candidates' BM25 scores, for a matcher with that feature.
    """
    q, c = torch.as_tensor(query_emb).float(), torch.as_tensor(cand_embs).float()
    if q.ndim != 2 or c.ndim != 3 or c.shape[0] != q.shape[0]:
        raise MixretError(f"score_candidates expects query_emb [Q, E] and cand_embs [Q, N, E], "
                          f"got {tuple(q.shape)} and {tuple(c.shape)}")
    mask = None if candidate_mask is None else torch.as_tensor(candidate_mask)
    lex = None if bm25 is None else torch.as_tensor(bm25)
    device = next(matcher.parameters()).device
    was_training = matcher.training
    matcher.eval()
    try:
        out = [matcher(q[i:i + batch_size].to(device), c[i:i + batch_size].to(device),
                       None if mask is None else mask[i:i + batch_size].to(device),
                       None if lex is None else lex[i:i + batch_size].to(device)).float().cpu()
               for i in range(0, len(q), batch_size)]
    finally:
        matcher.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(tuple(c.shape[:2]), np.float32)
