"""Building blocks shared by the architectures."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeedForward(nn.Module):
    """Linear(d, m*d) GELU Linear(m*d, d), applied to each position."""

    def __init__(self, d_model: int, mult: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, mult * d_model)
        self.proj = nn.Linear(mult * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        return self.drop(self.proj(F.gelu(self.fc(x))))


def near_identity_(linear: nn.Linear, noise: float = 0.02) -> None:
    """A square Linear becomes the identity plus noise of std noise/sqrt(d), with zero bias (token-mixing inits
    that pass their input through unchanged at the start)."""
    d = linear.in_features
    with torch.no_grad():
        linear.weight.copy_(torch.eye(d) + torch.randn(d, d) * (noise / d ** 0.5))
        if linear.bias is not None:
            linear.bias.zero_()


class PoolHead(nn.Module):
    """The embedding head: a learned causal weighted mean over the last hidden layer,
    out[t] = sum_{s<=t} softmax_s(A[t, :t+1])[s] h[s], with A starting at zero (the running mean).

    The embedding is its output at the last real token. At the start it is the mean of the text's hidden states,
    whatever the model learned to put at its last position (a language model puts the next token's prediction
    there), so contrastive training starts from an embedding that already tells texts apart; it then learns how
    to weigh each position. The weights stay a mean (positive, summing to 1), so a step of the optimizer moves
    them by the same relative amount at every length. A gets no weight decay (it is no Linear weight)."""

    def __init__(self, context: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(context, context))                          # A [C, C]
        self.register_buffer("future", torch.ones(context, context).triu(1).bool(), persistent=False)

    def weights(self, L: int) -> torch.Tensor:  # [L, L], rows sum to 1, zero above the diagonal
        return self.logits[:L, :L].masked_fill(self.future[:L, :L], float("-inf")).softmax(dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        return torch.einsum("ts,bsd->btd", self.weights(h.shape[1]).to(h.dtype), h)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample during training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm residual block: x + Mix(Norm(x)), then x + FF(Norm(x)).

    `mix` is the token-mixing module (masked mixing, hypermixing or attention); it also provides
    `new_cache` and `step` for incremental decoding.
    """

    def __init__(self, mix: nn.Module, ff: nn.Module, norm: type[nn.Module], d_model: int, drop_path: float):
        super().__init__()
        self.ln1 = norm(d_model)
        self.mix = mix
        self.ln2 = norm(d_model)
        self.ff = ff
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D]
        x = x + self.drop_path(self.mix(self.ln1(x)))
        return x + self.drop_path(self.ff(self.ln2(x)))

    def new_cache(self, batch_size: int, device, dtype) -> dict:
        return self.mix.new_cache(batch_size, device, dtype)

    def step(self, x: torch.Tensor, cache: dict, t: int) -> torch.Tensor:  # [B, T, D] at positions t..t+T-1
        x = x + self.drop_path(self.mix.step(self.ln1(x), cache, t))
        return x + self.drop_path(self.ff(self.ln2(x)))


def drop_path_rates(p: float, n_layers: int) -> list[float]:
    """Linearly increasing stochastic-depth rates, 0 at the first layer and p at the last."""
    return [p * i / max(n_layers - 1, 1) for i in range(n_layers)]
