"""ModelConfig: the one description of a causal LM that every part of mixret uses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mixret.errors import MixretError

ARCHS = ("masked-mixer", "hypermixer", "llama")
MIXING_INITS = ("random", "mean")
POOLINGS = ("last", "mean", "eos")


@dataclass
class ModelConfig:
    arch: str = "masked-mixer"
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 8
    context: int = 512          # maximum input length
    ff_mult: int = 4            # feed-forward expansion: Linear(d, ff_mult*d) GELU Linear(ff_mult*d, d)
    dropout: float = 0.0
    drop_path: float = 0.0      # stochastic depth, linearly increasing to this rate at the last layer
    tie_embeddings: bool = False
    mixing_init: str = "random"  # "mean": every token mixing starts as the running mean of its prefix
    pooling: str = "last"       # how `encode` embeds a text by default: "last", "mean" or "eos"
    # masked-mixer
    mixer_expand: bool = False  # two masked mixing matrices with GELU between
    mixer_heads: int = 1        # >1: project to heads, one masked matrix per head, project back
    mixer_kernel: int = 1       # >1: k masked matrices convolved along d_model
    # hypermixer
    hyper_dim: int = 64         # k': size of the generated token-mixing weights per head
    hyper_heads: int = 1
    hyper_tied: bool = False    # one hypernetwork generates both w1 and w2
    hyper_chunk: int = 64       # positions per chunk of the prefix-sum computation
    # llama
    n_heads: int = 4
    rope_theta: float = 10000.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise MixretError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.mixing_init not in MIXING_INITS:
            raise MixretError(f"unknown mixing_init {self.mixing_init!r}; expected one of {', '.join(MIXING_INITS)}")
        if self.pooling not in POOLINGS:
            raise MixretError(f"unknown pooling {self.pooling!r}; expected one of {', '.join(POOLINGS)}")
        for name in ("vocab_size", "d_model", "n_layers", "context", "ff_mult", "mixer_heads",
                     "mixer_kernel", "hyper_dim", "hyper_heads", "hyper_chunk", "n_heads"):
            if int(getattr(self, name)) < 1:
                raise MixretError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.drop_path < 1.0):
            raise MixretError("dropout and drop_path must be in [0, 1)")
        own = {
            "masked-mixer": {"mixer_expand", "mixer_heads", "mixer_kernel"},
            "hypermixer": {"hyper_dim", "hyper_heads", "hyper_tied", "hyper_chunk"},
            "llama": {"n_heads", "rope_theta"},
        }
        for arch, names in own.items():
            if arch == self.arch:
                continue
            for name in names:
                default = _FIELD_DEFAULTS[name]
                if getattr(self, name) != default:
                    raise MixretError(f"option {name} applies to arch {arch!r}, not {self.arch!r}")
        if self.arch == "masked-mixer" and self.d_model % self.mixer_heads:
            raise MixretError(f"d_model {self.d_model} is not divisible by mixer_heads {self.mixer_heads}")
        if self.arch == "masked-mixer" and self.mixer_heads > 1 and (self.mixer_expand or self.mixer_kernel > 1):
            raise MixretError("mixer_heads > 1 cannot be combined with mixer_expand or mixer_kernel")
        if self.arch == "masked-mixer" and self.mixer_expand and self.mixer_kernel > 1:
            raise MixretError("mixer_expand cannot be combined with mixer_kernel > 1")
        if self.arch == "hypermixer" and self.d_model % self.hyper_heads:
            raise MixretError(f"d_model {self.d_model} is not divisible by hyper_heads {self.hyper_heads}")
        if self.arch == "llama" and (self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2):
            raise MixretError(f"d_model {self.d_model} must split into {self.n_heads} heads of even size")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MixretError(f"{source}: unknown model option(s) {unknown}")
        return cls(**d)


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
