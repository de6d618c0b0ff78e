"""Llama-style transformer baseline: RoPE, RMSNorm, SwiGLU, causal scaled_dot_product_attention.

Incremental decoding (`step`) keeps a KV cache: rotated keys and values of every position so far.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from mixret.models.base import CausalLM
from mixret.models.config import ModelConfig
from mixret.models.layers import near_identity_


def rope_tables(context: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [context, head_dim/2] for rotary position embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(context).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, E] rotated by position (features 2i and 2i+1 as a pair); cos, sin [L, E/2]."""
    x1, x2 = rearrange(x, "... (e two) -> two ... e", two=2)                  # features 2i, 2i+1: [B, H, L, E/2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)     # [B, H, L, E/2, 2]
    out = rearrange(out, "... e two -> ... (e two)")                         # interleaved back: [B, H, L, E]
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        cos, sin = rope_tables(cfg.context, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def init_mean_(self) -> None:
        """The running mean of the input: a zero query projection makes every score 0, so position t attends
        uniformly to 0..t; the value and output projections start near the identity."""
        D = self.proj.in_features
        with torch.no_grad():
            self.qkv.weight[:D].zero_()
            self.qkv.weight[2 * D:] = torch.eye(D) + torch.randn(D, D) * (0.02 / D ** 0.5)
        near_identity_(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        L = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b l (qkv h e) -> qkv b h l e", qkv=3, h=self.h)  # each [B, H, L, E]
        q, k = apply_rope(q, self.cos[:L], self.sin[:L]), apply_rope(k, self.cos[:L], self.sin[:L])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h l e -> b l (h e)"))                # [B, L, D]

    def new_cache(self, batch_size: int, device, dtype) -> dict:
        """Rotated keys "k" and values "v" so far: [B, H, context, E] each."""
        D = self.proj.in_features
        shape = (batch_size, self.h, self.cos.shape[0], D // self.h)
        return {name: torch.zeros(shape, device=device, dtype=dtype) for name in ("k", "v")}

    def step(self, x: torch.Tensor, cache: dict, t: int) -> torch.Tensor:  # [B, T, D] at t..t+T-1 -> [B, T, D]
        T = x.shape[1]
        end = t + T
        q, k, v = rearrange(self.qkv(x), "b t (qkv h e) -> qkv b h t e", qkv=3, h=self.h)  # each [B, H, T, E]
        cos, sin = self.cos[t:end], self.sin[t:end]
        cache["k"][:, :, t:end] = apply_rope(k, cos, sin)
        cache["v"][:, :, t:end] = v
        sees = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=t)  # position t+i sees 0..t+i
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), cache["k"][:, :, :end], cache["v"][:, :, :end],
                                           attn_mask=sees)
        return self.proj(rearrange(y, "b h t e -> b t (h e)"))                # [B, T, D]


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), hidden size 2/3 of ff_mult * d (rounded up to a multiple of 8)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = -(-(2 * cfg.ff_mult * cfg.d_model // 3) // 8) * 8
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class LlamaLM(CausalLM):
    norm_class = nn.RMSNorm

    def make_mix(self) -> nn.Module:
        return Attention(self.config)

    def make_ff(self) -> nn.Module:
        return SwiGLU(self.config)
