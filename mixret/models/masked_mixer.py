"""Masked mixer: an MLP-Mixer whose token mixing is a learned, lower-triangular (causal) matrix.

The mask is applied functionally (W * tril) in every forward pass, so masked entries get exactly zero
gradient. An input of length L <= context uses the top-left L x L block of each mixing matrix.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixret.models.base import CausalLM
from mixret.models.config import ModelConfig
from mixret.models.layers import DropPath, FeedForward, drop_path_rates


class MaskedMixing(nn.Module):
    """n masked (context x context) matrices with a bias per output position.

    `mix(x, i)` applies matrix i along the sequence axis: out[..., t, :] = sum_{s<=t} W_i[t, s] x[..., s, :] + b_i[t].
    """

    def __init__(self, n: int, context: int):
        super().__init__()
        bound = 1 / math.sqrt(context)  # nn.Conv1d's default init with `context` input channels
        self.weight = nn.Parameter(torch.empty(n, context, context).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, context).uniform_(-bound, bound))
        self.register_buffer("tril", torch.tril(torch.ones(context, context)), persistent=False)

    def masked(self, L: int) -> torch.Tensor:  # [n, L, L]
        return self.weight[:, :L, :L] * self.tril[:L, :L]


class FlatMix(nn.Module):
    """One masked matrix, or two with GELU between them (expanded)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mats = MaskedMixing(2 if cfg.mixer_expand else 1, cfg.context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        L = x.shape[1]
        W, b = self.mats.masked(L), self.mats.bias[:, :L]
        x = torch.einsum("ts,bsd->btd", W[0], x) + b[0, :, None]
        if W.shape[0] == 2:
            x = torch.einsum("ts,bsd->btd", W[1], F.gelu(x)) + b[1, :, None]
        return x


class HeadsMix(nn.Module):
    """Project to h heads, one masked matrix per head, concatenate, project back."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h = cfg.mixer_heads
        self.proj_in = nn.Linear(cfg.d_model, cfg.d_model)
        self.mats = MaskedMixing(self.h, cfg.context)
        self.proj_out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        B, L, D = x.shape
        x = self.proj_in(x).view(B, L, self.h, D // self.h)                  # [B, L, h, D/h]
        y = torch.einsum("hts,bshe->bthe", self.mats.masked(L), x)           # [B, L, h, D/h]
        y = y + self.mats.bias[:, :L].T[None, :, :, None]
        return self.proj_out(y.reshape(B, L, D))


class KernelMix(nn.Module):
    """k masked matrices convolved along d_model:
    out[t, f] = sum_{s<=t} sum_tau W_tau[t, s] x[s, f + tau - k//2] + b[t]  (zero padding along d_model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.mixer_kernel
        self.mats = MaskedMixing(self.k, cfg.context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        L, D = x.shape[1], x.shape[2]
        left = self.k // 2
        xp = F.pad(x, (left, self.k - 1 - left))                              # [B, L, D + k - 1]
        shifted = torch.stack([xp[..., tau:tau + D] for tau in range(self.k)], dim=1)  # [B, k, L, D]
        y = torch.einsum("kts,bksd->btd", self.mats.masked(L), shifted)
        return y + self.mats.bias[0, :L, None]


class MixerBlock(nn.Module):
    """x + Mix(LN(x)), then x + FF(LN(x))."""

    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        if cfg.mixer_heads > 1:
            self.mix = HeadsMix(cfg)
        elif cfg.mixer_kernel > 1:
            self.mix = KernelMix(cfg)
        else:
            self.mix = FlatMix(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.ff_mult, cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        x = x + self.drop_path(self.mix(self.ln1(x)))
        return x + self.drop_path(self.ff(self.ln2(x)))


class MaskedMixerLM(CausalLM):
    def make_block(self, i: int) -> nn.Module:
        return MixerBlock(self.config, drop_path_rates(self.config.drop_path, self.config.n_layers)[i])
