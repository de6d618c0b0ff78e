"""Causal HyperMixer: token-mixing weights generated per token by small hypernetworks.

For each head, hypernetworks map token t (plus its position) to w1_t, w2_t in R^k'. The mixing output at t is
    y_t = w2_t^T GELU(H_t / t),    H_t = sum_{s<=t} w1_s x_s^T   (prefix state, [k', d_head])
so position t only sees positions <= t, and the cost is linear in L. The prefix sums run in chunks (fp32, with
activation checkpointing per chunk while training), so memory per layer is O(chunk * k' * d), not O(L * k' * d).
Incremental decoding (`step`) carries H_t per layer and head: O(k' * d) per token, whatever the position.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange
from torch.utils.checkpoint import checkpoint

from mixret.models.base import CausalLM
from mixret.models.config import ModelConfig
from mixret.models.layers import near_identity_


def hypermix_chunk(w1, w2, x, state, start: int):
    """One chunk of the prefix-sum recurrence, in fp32.

    w1, w2: [B, C, H, K]; x: [B, C, H, E]; state: [B, H, K, E] = H_{start} (sum over the positions before the chunk).
    Returns y [B, C, H, E] and the state after the chunk.
    """
    C = x.shape[1]
    outer = einsum(w1, x, "b c h k, b c h e -> b c h k e")                 # w1_s x_s^T: [B, C, H, K, E]
    Hs = rearrange(state, "b h k e -> b 1 h k e") + outer.cumsum(dim=1)    # [B, C, H, K, E]: H_t for t in chunk
    n = torch.arange(start + 1, start + C + 1, device=x.device, dtype=Hs.dtype).view(1, C, 1, 1, 1)
    y = einsum(w2, F.gelu(Hs / n), "b c h k, b c h k e -> b c h e")       # w2_t^T GELU(H_t / t): [B, C, H, E]
    return y, Hs[:, -1]


def hypermix(w1, w2, x, chunk: int, use_checkpoint: bool = False) -> torch.Tensor:
    """Causal hypermixing over the whole sequence, chunk by chunk. Shapes as in hypermix_chunk; returns fp32 y."""
    B, L, H, E = x.shape
    w1, w2, x = w1.float(), w2.float(), x.float()
    state = x.new_zeros(B, H, w1.shape[-1], E)
    ys = []
    for s in range(0, L, chunk):
        args = (w1[:, s:s + chunk], w2[:, s:s + chunk], x[:, s:s + chunk], state, s)
        if use_checkpoint:
            y, state = checkpoint(hypermix_chunk, *args, use_reentrant=False)
        else:
            y, state = hypermix_chunk(*args)
        ys.append(y)
    return torch.cat(ys, dim=1)


class HyperNetwork(nn.Module):
    """Small MLP: token representation (plus position) -> heads * k' mixing weights."""

    def __init__(self, d_model: int, out: int):
        super().__init__()
        self.fc = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, out]
        return self.proj(F.gelu(self.fc(x)))


class HyperMixing(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.k, self.chunk = cfg.hyper_heads, cfg.hyper_dim, cfg.hyper_chunk
        self.pos = nn.Embedding(cfg.context, cfg.d_model)  # position information for the hypernetworks
        self.hyper1 = HyperNetwork(cfg.d_model, self.h * self.k)
        self.hyper2 = self.hyper1 if cfg.hyper_tied else HyperNetwork(cfg.d_model, self.h * self.k)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def init_mean_(self) -> None:
        """Constant generated weights that make y_t the running mean of x_{<=t}.

        The hypernetworks' output weights become zero and their biases alternate in sign: w1 = (1, -1, 1, ...)
        and w2 = (a, -a, a, ...) with a = 2/k', so each pair of slots gives a*GELU(m) - a*GELU(-m) = a*m with
        m = H_t/t the prefix mean, and the k'/2 pairs sum to m (tied: w1 = w2 = +-sqrt(2/k')). An odd last slot is 0.
        The output projection starts near the identity.
        """
        k = self.k - self.k % 2
        sign = torch.tensor([1.0, -1.0]).repeat(k // 2)
        scales = (1.0, 2.0 / k) if self.hyper2 is not self.hyper1 else ((2.0 / k) ** 0.5,)
        with torch.no_grad():
            for net, scale in zip((self.hyper1, self.hyper2), scales):
                net.proj.weight.zero_()
                net.proj.bias.zero_()
                net.proj.bias.view(self.h, self.k)[:, :k] = scale * sign
        near_identity_(self.proj)

    def weights(self, x: torch.Tensor, start: int = 0):
        """x [B, L, D] at positions start..start+L-1 -> w1, w2 [B, L, h, k'] and x per head [B, L, h, D/h]."""
        p = x + self.pos.weight[start:start + x.shape[1]]
        w1 = rearrange(self.hyper1(p), "b l (h k) -> b l h k", h=self.h)  # [B, L, h, k']
        w2 = rearrange(self.hyper2(p), "b l (h k) -> b l h k", h=self.h)  # [B, L, h, k']
        return w1, w2, rearrange(x, "b l (h e) -> b l h e", h=self.h)     # x per head: [B, L, h, D/h]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        w1, w2, xh = self.weights(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = hypermix(w1, w2, xh, self.chunk, use_checkpoint=self.training and torch.is_grad_enabled())
        return self.proj(rearrange(y.to(x.dtype), "b l h e -> b l (h e)"))  # heads concatenated: [B, L, D]

    def new_cache(self, batch_size: int, device, dtype) -> dict:
        """The prefix state H_t per head, fp32: "state" [B, h, k', D/h] (the position t comes with each step)."""
        D = self.proj.in_features
        return {"state": torch.zeros(batch_size, self.h, self.k, D // self.h, device=device, dtype=torch.float32)}

    def step(self, x: torch.Tensor, cache: dict, t: int) -> torch.Tensor:  # [B, T, D] at t..t+T-1 -> [B, T, D]
        T = x.shape[1]
        w1, w2, xh = self.weights(x, start=t)
        ys = []
        with torch.autocast(device_type=x.device.type, enabled=False):
            for s in range(0, T, self.chunk):
                y, cache["state"] = hypermix_chunk(w1[:, s:s + self.chunk].float(), w2[:, s:s + self.chunk].float(),
                                                   xh[:, s:s + self.chunk].float(), cache["state"], t + s)
                ys.append(y)
        return self.proj(rearrange(torch.cat(ys, dim=1).to(x.dtype), "b t h e -> b t (h e)"))  # [B, T, D]


class HyperMixerLM(CausalLM):
    def make_mix(self) -> nn.Module:
        return HyperMixing(self.config)
