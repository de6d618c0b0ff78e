"""CausalLM: token embedding -> blocks -> final norm -> LM head, shared by every architecture.

An architecture subclasses it and provides `make_mix()` (its token mixing), and may override `make_ff()` and
`norm` (the normalisation class).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixret import io
from mixret.errors import MixretError
from mixret.models.config import ModelConfig
from mixret.models.encode import EmbeddingSpec, encode
from mixret.models.generate import SAMPLING, generate
from mixret.models.layers import Block, FeedForward, PoolHead, drop_path_rates


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor         # [B, L, V]
    hidden_states: torch.Tensor  # [B, L, D], last layer after the final norm


@dataclass
class Cache:
    """Incremental-decoding state for `CausalLM.step`: one entry per block, and how many positions it holds."""
    batch_size: int
    layers: list[dict]
    pos: int = 0


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tokenizer = None  # attached by mixret.load / the trainer
        self.trained_on = None  # the data that trained it (mixret.data.sources_record), saved in config.json
        # pooling / max_length its embeddings use unless told otherwise (a fine-tuned embedder's), in config.json
        self.embedding_defaults: dict = {}
        self.weights_hash = None  # file hash of the model.safetensors it was loaded from (set by mixret.load)
        self.source = None        # the folder it was loaded from (set by mixret.load)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        rates = drop_path_rates(config.drop_path, config.n_layers)
        self.blocks = nn.ModuleList([Block(self.make_mix(), self.make_ff(), self.norm_class, config.d_model, rate)
                                     for rate in rates])
        self.norm = self.norm_class(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.pool_head = PoolHead(config.context) if config.pool_head else None
        if config.mixing_init == "mean":
            for block in self.blocks:
                block.mix.init_mean_()

    norm_class: type[nn.Module] = nn.LayerNorm

    def make_mix(self) -> nn.Module:
        raise NotImplementedError

    def make_ff(self) -> nn.Module:
        return FeedForward(self.config.d_model, self.config.ff_mult, self.config.dropout)

    # -- forward ------------------------------------------------------------------------------
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, L, D] last-layer hidden states (after the final norm)."""
        L = input_ids.shape[1]
        if L > self.config.context:
            raise MixretError(f"input length {L} exceeds the model's context {self.config.context}")
        x = self.drop(self.wte(input_ids))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> CausalLMOutput:
        h = self.hidden(input_ids)
        logits = self.lm_head(h)  # [B, L, V]
        loss = None
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            # position t predicts token t+1; padding (-100) is ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=h)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] right-padded ids -> [B, D]: the last layer (through the embedding head, when the model has one)
        at each row's last non-pad token."""
        h = self.hidden(input_ids)
        if self.pool_head is not None:
            h = self.pool_head(h)
        if attention_mask is None:
            return h[:, -1]
        return h[torch.arange(h.shape[0], device=h.device), last_index(attention_mask)]

    def needs_pool_head(self, pooling: str) -> bool:
        """Whether embedding with `pooling` needs the embedding head first: last/eos pooling of a model without one
        that was not trained to embed (its folder records no pooling), whose last position predicts the next
        token. A model trained to embed keeps its own embedding."""
        return pooling != "mean" and self.pool_head is None and "pooling" not in self.embedding_defaults

    def freeze_lm_head(self) -> None:
        """For training the embedding, which never uses the LM head: an untied head is frozen (DDP needs every
        trained parameter to get a gradient); a tied one is the token embedding and trains with it."""
        if not self.config.tie_embeddings:
            self.lm_head.requires_grad_(False)

    def add_pool_head(self) -> None:
        """Give the model a fresh embedding head (PoolHead, the running mean), recorded in its config."""
        self.config = dataclasses.replace(self.config, pool_head=True)
        self.pool_head = PoolHead(self.config.context).to(self.wte.weight.device)

    @property
    def spec(self) -> EmbeddingSpec:
        """Its own embedding spec: the hash of the weights it was loaded from, and the pooling and max_length its
        config.json sets (None where it sets none)."""
        return EmbeddingSpec(self.weights_hash, self.embedding_defaults.get("pooling"),
                             self.embedding_defaults.get("max_length"))

    def encode(self, texts, **kwargs):
        """Texts -> [N, D] embeddings in input order (needs `self.tokenizer`); see `mixret.models.encode.encode`."""
        return encode(self, texts, **kwargs)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- incremental decoding -----------------------------------------------------------------
    def new_cache(self, batch_size: int) -> Cache:
        """An empty cache for `step`, on the model's device and dtype."""
        w = self.wte.weight
        return Cache(batch_size, [block.new_cache(batch_size, w.device, w.dtype) for block in self.blocks])

    def step(self, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """[B, T] ids at positions cache.pos..cache.pos+T-1 -> [B, T, V] logits, reusing the cached positions.

        Pass the prompt first (prefill), then one token at a time. The logits equal those of `forward` on the
        whole sequence so far (up to float rounding). Use in eval mode.
        """
        B, T = input_ids.shape
        if B != cache.batch_size:
            raise MixretError(f"step got a batch of {B} rows but the cache was made for {cache.batch_size}")
        if cache.pos + T > self.config.context:
            raise MixretError(f"{cache.pos} cached positions + {T} new ones exceed the model's context "
                              f"{self.config.context}")
        x = self.drop(self.wte(input_ids))
        for block, entry in zip(self.blocks, cache.layers):
            x = block.step(x, entry, cache.pos)
        cache.pos += T
        return self.lm_head(self.norm(x))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = SAMPLING.max_new_tokens,
                 temperature: float = SAMPLING.temperature, top_k: int | None = SAMPLING.top_k,
                 top_p: float | None = SAMPLING.top_p, *, generator: torch.Generator | None = None,
                 eos_id: int | None = None) -> torch.Tensor:
        """[B, P] prompt ids -> [B, P + n]: the prompt followed by the new tokens (temperature 0 = greedy).

        See `mixret.models.generate.generate`; warns when the context filled up before max_new_tokens.
        """
        out = generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, generator=generator,
                       eos_id=eos_id)
        if out.context_full:
            warnings.warn(f"generation stopped at the model's context of {self.config.context} tokens",
                          stacklevel=2)
        return out.ids

    # -- save / load --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> None:
        """Write config.json, model.safetensors and (if there is a tokenizer) tokenizer.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        io.save_weights(self, directory)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            if tokenizer.vocab_size > self.config.vocab_size:
                raise MixretError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                                  f"is {self.config.vocab_size}")
            tokenizer.save(directory / io.TOKENIZER_NAME)
        extra = {**self.embedding_defaults, **({} if self.trained_on is None else {"trained_on": self.trained_on})}
        io.write_config(directory, "clm", {**extra, **self.config.to_dict()})



def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 0/1 mask -> [B] index of each row's last 1 (0 for an all-zero row)."""
    L = attention_mask.shape[1]
    pos = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return (pos * (attention_mask != 0)).amax(dim=1)
