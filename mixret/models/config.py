"""ModelConfig: the one description of a causal LM that every part of mixret uses.

Each field is declared once, here, with its help text: `model_options()` derives from the fields the
option names that `mixret pretrain` (its flags, its config file and its train_config.json) accepts.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from mixret import io
from mixret.errors import MixretError
from mixret.options import option, option_fields

ARCHS = ("masked-mixer", "hypermixer", "llama")
MIXING_INITS = ("random", "mean")


@dataclass
class ModelConfig:
    arch: str = option("masked-mixer", "Architecture.", choices=ARCHS)
    vocab_size: int = option(4096, "Vocabulary size (set by the tokenizer).", derived=True)
    d_model: int = option(256, "Model width.")
    n_layers: int = option(8, "Number of blocks.", name="layers")
    context: int = option(512, "Longest sequence, in tokens; longer documents are truncated.")
    ff_mult: int = option(4, "Feed-forward expansion: Linear(d, ff_mult*d) GELU Linear(ff_mult*d, d).")
    dropout: float = option(0.0, "Dropout rate.")
    drop_path: float = option(0.0, "Stochastic depth rate at the last layer (0 at the first).")
    tie_embeddings: bool = option(False, "Share the input embedding and the LM head.")
    mixing_init: str = option("random", "Token-mixing init: random, or mean (every mixing starts as the running "
                               "mean of its prefix, so the last position summarises the whole text).",
                               choices=MIXING_INITS)
    mixer_expand: bool = option(False, "masked-mixer: two mixing matrices with GELU between.", arch="masked-mixer")
    mixer_heads: int = option(1, "masked-mixer: mixing heads (project, one matrix per head, project back).",
                               arch="masked-mixer")
    mixer_kernel: int = option(1, "masked-mixer: mixing matrices convolved along d_model.", arch="masked-mixer")
    hyper_dim: int = option(64, "hypermixer: size of the generated token-mixing weights per head.",
                             arch="hypermixer")
    hyper_heads: int = option(1, "hypermixer: heads.", arch="hypermixer")
    hyper_tied: bool = option(False, "hypermixer: one hypernetwork generates both mixing weights.",
                               arch="hypermixer")
    hyper_chunk: int = option(64, "hypermixer: positions per chunk of the prefix-sum computation.",
                               arch="hypermixer")
    pool_head: bool = option(False, "An embedding head over the last hidden layer (added by finetune with "
                                    "last-token pooling).", derived=True)
    n_heads: int = option(4, "llama: attention heads.", arch="llama")
    rope_theta: float = option(10000.0, "llama: RoPE base.", arch="llama")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        types = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), types[f.name]
            if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise MixretError(f"{f.name} must be a positive integer, got {v!r}")
            if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise MixretError(f"{f.name} must be a number, got {v!r}")
            if kind is bool and not isinstance(v, bool):
                raise MixretError(f"{f.name} must be true or false, got {v!r}")
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                raise MixretError(f"unknown {f.name} {v!r}; expected one of {', '.join(choices)}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.drop_path < 1.0):
            raise MixretError("dropout and drop_path must be in [0, 1)")
        for f in dataclasses.fields(self):
            arch = f.metadata.get("arch")
            if arch is not None and arch != self.arch and getattr(self, f.name) != f.default:
                raise MixretError(f"option {f.name} applies to arch {arch!r}, not {self.arch!r}")
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
        return io.options_from_dict(cls, d, source, "model")


def model_options(config_class: type = ModelConfig) -> dict[str, dataclasses.Field]:
    """Option name -> ModelConfig field, for every field a user sets (not those derived, like vocab_size)."""
    return option_fields(config_class)
