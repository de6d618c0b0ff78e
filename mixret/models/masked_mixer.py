"""Masked mixer: an MLP-Mixer whose token mixing is a learned, lower-triangular (causal) matrix.

The mask is applied functionally (W * tril) in every forward pass, so masked entries get exactly zero
gradient. An input of length L <= context uses the top-left L x L block of each mixing matrix.

Incremental decoding (`step`) keeps, per layer, the mixing inputs seen so far (the normalised inputs; for
the expanded mixer also the first matrix's GELU outputs; per-head projections; or the d_model-shifted copies
for kernel k). A new position t then needs only row t of each matrix times the cached column: O(t * d).

On the CPU, from BLOCKED_MIN_LEN positions on, the flat and expanded mixers multiply by the masked matrix
block by block (`tril_matmul`): the all-zero blocks above the diagonal are never computed, which skips about
half of the product in the forward and the backward pass (see docs/benchmarks.md for the measured gain).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from mixret.models.base import CausalLM
from mixret.models.config import ModelConfig
from mixret.models.layers import near_identity_

BLOCK = 256             # rows (and columns) per block of `tril_matmul`
BLOCKED_MIN_LEN = 512   # sequence length from which FlatMix uses `tril_matmul` on the CPU


class _TrilMatmul(torch.autograd.Function):
    """tril(w) @ x, one row block at a time; under autocast the products run in the autocast dtype."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:  # [L, L], [L, N] -> [L, N]
        on = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if on else torch.promote_types(w.dtype, x.dtype)
        wc, xc = w.to(dtype), x.to(dtype)
        L = xc.shape[0]
        out = torch.empty_like(xc)
        for s in range(0, L, block):
            e = min(s + block, L)
            torch.mm(wc[s:e, s:e].tril(), xc[s:e], out=out[s:e])   # diagonal block, masked
            if s:
                out[s:e].addmm_(wc[s:e, :s], xc[:s])                 # blocks left of the diagonal, all kept
        ctx.save_for_backward(wc, xc)
        ctx.block, ctx.dtypes = block, (w.dtype, x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        wc, xc = ctx.saved_tensors
        g = grad.to(wc.dtype)                                          # [L, N]
        L, block = wc.shape[0], ctx.block
        gw = gx = None
        if ctx.needs_input_grad[0]:                                    # tril(g @ x^T): zero above the diagonal
            gw = g.new_zeros(L, L)
            for s in range(0, L, block):
                e = min(s + block, L)
                gw[s:e, :e] = g[s:e] @ xc[:e].T
                gw[s:e, s:e].tril_()
            gw = gw.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:                                    # tril(w)^T @ g, one column block at a time
            gx = torch.empty_like(g)
            for s in range(0, L, block):
                e = min(s + block, L)
                torch.mm(wc[s:e, s:e].tril().T, g[s:e], out=gx[s:e])
                if e < L:
                    gx[s:e].addmm_(wc[e:, s:e].T, g[e:])
            gx = gx.to(ctx.dtypes[1])
        return gw, gx, None


def tril_matmul(w: torch.Tensor, x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """tril(w) @ x for w [L, L] and x [L, N] -> [L, N], skipping the blocks above the diagonal.

    Entries of w above the diagonal are never read and get zero gradient, as with `w * tril`.
    """
    return _TrilMatmul.apply(w, x, block)


def use_blocked(x: torch.Tensor) -> bool:
    """Whether FlatMix multiplies block by block for this input [B, L, D]."""
    return x.device.type == "cpu" and x.shape[1] >= BLOCKED_MIN_LEN and not torch.compiler.is_compiling()


class MaskedMixing(nn.Module):
    """n masked (context x context) matrices with a bias per output position: one bias row per matrix, or
    `n_bias` rows when the matrices' outputs are summed into one (the kernel mixer: one row, as a Conv1d has).

    `mix(x, i)` applies matrix i along the sequence axis: out[..., t, :] = sum_{s<=t} W_i[t, s] x[..., s, :] + b_i[t].
    """
    decayed_parameters = ("weight",)  # the mixing matrices get weight decay, the biases do not

    def __init__(self, n: int, context: int, n_bias: int | None = None):
        super().__init__()
        bound = 1 / math.sqrt(context)  # nn.Conv1d's default init with `context` input channels
        self.weight = nn.Parameter(torch.empty(n, context, context).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n if n_bias is None else n_bias, context).uniform_(-bound, bound))
        self.register_buffer("tril", torch.tril(torch.ones(context, context)), persistent=False)

    def init_(self, kinds: list[str]) -> None:
        """Matrix i becomes kinds[i]: "mean" (row t = 1/(t+1) on s <= t, the running mean), "identity" or "zero",
        plus noise of std 0.02/sqrt(context); the bias becomes zero."""
        C = self.context
        start = {"mean": torch.ones(C, C).tril() / torch.arange(1, C + 1).unsqueeze(1),   # [C, C]
                 "identity": torch.eye(C), "zero": torch.zeros(C, C)}
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02 / math.sqrt(C))
            for i, kind in enumerate(kinds):
                self.weight[i] += start[kind]
            self.bias.zero_()

    def masked(self, L: int) -> torch.Tensor:  # [n, L, L]
        return self.weight[:, :L, :L] * self.tril[:L, :L]

    def rows(self, start: int, end: int) -> torch.Tensor:  # [n, end - start, end]
        """Masked rows start..end-1 (columns 0..end-1): the weights that mix positions start..end-1."""
        return self.weight[:, start:end, :end] * self.tril[start:end, :end]

    def mix(self, x: torch.Tensor, i: int) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        """Matrix i along the sequence axis, plus its bias (`tril_matmul` on long inputs, see `use_blocked`)."""
        B, L, _ = x.shape
        if use_blocked(x):
            y = tril_matmul(self.weight[i, :L, :L], rearrange(x, "b l d -> l (b d)"), BLOCK)   # [L, B*D]
            return rearrange(y + self.bias[i, :L, None], "l (b d) -> b l d", b=B).contiguous()  # [B, L, D]
        W = self.weight[i, :L, :L] * self.tril[:L, :L]
        return torch.einsum("ts,bsd->btd", W, x) + self.bias[i, :L, None]

    @property
    def context(self) -> int:
        return self.weight.shape[-1]


class FlatMix(nn.Module):
    """One masked matrix, or two with GELU between them (expanded)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model = cfg.d_model
        self.mats = MaskedMixing(2 if cfg.mixer_expand else 1, cfg.context)

    def init_mean_(self) -> None:
        """The running mean; expanded: the running mean, then GELU, then the identity."""
        self.mats.init_(["mean", "identity"][:self.mats.weight.shape[0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        x = self.mats.mix(x, 0)
        if self.mats.weight.shape[0] == 2:
            x = self.mats.mix(F.gelu(x), 1)
        return x

    def new_cache(self, batch_size: int, device, dtype) -> dict:
        """Inputs so far, [B, context, D]: "x" (normalised inputs) and, when expanded, "g" (first GELU outputs)."""
        names = ("x", "g") if self.mats.weight.shape[0] == 2 else ("x",)
        shape = (batch_size, self.mats.context, self.d_model)
        return {name: torch.zeros(shape, device=device, dtype=dtype) for name in names}

    def step(self, x: torch.Tensor, cache: dict, t: int) -> torch.Tensor:  # [B, T, D] at t..t+T-1 -> [B, T, D]
        end = t + x.shape[1]
        W, b = self.mats.rows(t, end), self.mats.bias[:, t:end]
        cache["x"][:, t:end] = x
        y = torch.einsum("ts,bsd->btd", W[0], cache["x"][:, :end]) + b[0, :, None]
        if W.shape[0] == 2:
            cache["g"][:, t:end] = F.gelu(y)
            y = torch.einsum("ts,bsd->btd", W[1], cache["g"][:, :end]) + b[1, :, None]
        return y


class HeadsMix(nn.Module):
    """Project to h heads, one masked matrix per head, concatenate, project back."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h = cfg.mixer_heads
        self.proj_in = nn.Linear(cfg.d_model, cfg.d_model)
        self.mats = MaskedMixing(self.h, cfg.context)
        self.proj_out = nn.Linear(cfg.d_model, cfg.d_model)

    def init_mean_(self) -> None:
        """Every head the running mean, between projections near the identity."""
        self.mats.init_(["mean"] * self.h)
        near_identity_(self.proj_in)
        near_identity_(self.proj_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        L = x.shape[1]
        x = rearrange(self.proj_in(x), "b l (h e) -> b l h e", h=self.h)     # [B, L, h, D/h]
        y = torch.einsum("hts,bshe->bthe", self.mats.masked(L), x)           # [B, L, h, D/h]
        y = y + rearrange(self.mats.bias[:, :L], "h l -> l h 1")             # bias per position and head
        return self.proj_out(rearrange(y, "b l h e -> b l (h e)"))           # [B, L, D]

    def new_cache(self, batch_size: int, device, dtype) -> dict:
        """Projected inputs so far, per head: "x" [B, context, h, D/h]."""
        D = self.proj_in.out_features
        shape = (batch_size, self.mats.context, self.h, D // self.h)
        return {"x": torch.zeros(shape, device=device, dtype=dtype)}

    def step(self, x: torch.Tensor, cache: dict, t: int) -> torch.Tensor:  # [B, T, D] at t..t+T-1 -> [B, T, D]
        end = t + x.shape[1]
        cache["x"][:, t:end] = rearrange(self.proj_in(x), "b t (h e) -> b t h e", h=self.h)  # [B, T, h, D/h]
        y = torch.einsum("hts,bshe->bthe", self.mats.rows(t, end), cache["x"][:, :end])  # [B, T, h, D/h]
        y = y + rearrange(self.mats.bias[:, t:end], "h t -> t h 1")                      # bias per position and head
        return self.proj_out(rearrange(y, "b t h e -> b t (h e)"))                       # [B, T, D]


class KernelMix(nn.Module):
    """k masked matrices convolved along d_model:
    out[t, f] = sum_{s<=t} sum_tau W_tau[t, s] x[s, f + tau - k//2] + b[t]  (zero padding along d_model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.mixer_kernel
        self.d_model = cfg.d_model
        self.mats = MaskedMixing(self.k, cfg.context, n_bias=1)  # the k products are summed: one bias

    def init_mean_(self) -> None:
        """The unshifted matrix (tau = k//2) becomes the running mean, the shifted ones start near zero."""
        self.mats.init_(["zero"] * (self.k // 2) + ["mean"] + ["zero"] * (self.k - 1 - self.k // 2))

    def shifted(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, k, L, D]
        """x[..., f + tau - k//2] for each tau, zero outside 0..D-1."""
        D = x.shape[-1]
        left = self.k // 2
        xp = F.pad(x, (left, self.k - 1 - left))                              # [B, L, D + k - 1]
        return rearrange([xp[..., tau:tau + D] for tau in range(self.k)], "k b l d -> b k l d")  # k: the shift tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        L = x.shape[1]
        y = torch.einsum("kts,bksd->btd", self.mats.masked(L), self.shifted(x))
        return y + self.mats.bias[0, :L, None]

    def new_cache(self, batch_size: int, device, dtype) -> dict:
        """Shifted inputs so far: "x" [B, k, context, D]."""
        shape = (batch_size, self.k, self.mats.context, self.d_model)
        return {"x": torch.zeros(shape, device=device, dtype=dtype)}

    def step(self, x: torch.Tensor, cache: dict, t: int) -> torch.Tensor:  # [B, T, D] at t..t+T-1 -> [B, T, D]
        end = t + x.shape[1]
        cache["x"][:, :, t:end] = self.shifted(x)
        y = torch.einsum("kts,bksd->btd", self.mats.rows(t, end), cache["x"][:, :, :end])
        return y + self.mats.bias[0, t:end, None]


class MaskedMixerLM(CausalLM):
    def make_mix(self) -> nn.Module:
        cfg = self.config
        if cfg.mixer_heads > 1:
            return HeadsMix(cfg)
        if cfg.mixer_kernel > 1:
            return KernelMix(cfg)
        return FlatMix(cfg)
