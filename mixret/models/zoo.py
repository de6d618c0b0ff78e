"""The model zoo: every architecture by name, `build_model(cfg)`, `load(dir)` and the table of `mixret models`."""
from __future__ import annotations

import os
from pathlib import Path

from mixret import io
from mixret.errors import MixretError
from mixret.models.base import CausalLM
from mixret.models.config import ModelConfig
from mixret.models.hypermixer import HyperMixerLM
from mixret.models.llama import LlamaLM
from mixret.models.masked_mixer import MaskedMixerLM
from mixret.tokenizer import load_tokenizer

EMBEDDING_DEFAULTS = ("pooling", "max_length")  # config.json keys a model may set for its embeddings


MODEL_CLASSES = {"masked-mixer": MaskedMixerLM, "hypermixer": HyperMixerLM, "llama": LlamaLM}


# Named variants shown by `mixret models` and used by the benchmarks: name -> config overrides.
VARIANTS = {
    "masked-mixer (flat)": {"arch": "masked-mixer"},
    "masked-mixer (expanded)": {"arch": "masked-mixer", "mixer_expand": True},
    "masked-mixer (4 heads)": {"arch": "masked-mixer", "mixer_heads": 4},
    "masked-mixer (kernel 4)": {"arch": "masked-mixer", "mixer_kernel": 4},
    "hypermixer": {"arch": "hypermixer"},
    "llama": {"arch": "llama"},
}


def build_model(cfg: ModelConfig) -> CausalLM:
    return MODEL_CLASSES[cfg.arch](cfg)


def load(directory: str | os.PathLike) -> CausalLM:
    """Load a model saved with `save_pretrained`: config.json + model.safetensors (+ tokenizer.json)."""
    directory = Path(directory)
    raw = io.read_config(directory, "clm", "language model", "model")
    cfg_path = directory / io.CONFIG_NAME
    trained_on = raw.pop("trained_on", None)
    embedding_defaults = {k: raw.pop(k) for k in EMBEDDING_DEFAULTS if k in raw}
    model = build_model(ModelConfig.from_dict(raw, source=str(cfg_path)))
    model.trained_on, model.embedding_defaults = trained_on, embedding_defaults
    io.load_weights(model, directory)
    model.weights_hash, model.source = io.file_hash(directory / io.WEIGHTS_NAME), str(directory)
    tok_path = directory / io.TOKENIZER_NAME
    if tok_path.exists():
        model.tokenizer = load_tokenizer(tok_path)
        if model.tokenizer.vocab_size > model.config.vocab_size:
            raise MixretError(f"{tok_path}: tokenizer has {model.tokenizer.vocab_size} tokens but "
                              f"{cfg_path} says vocab_size={model.config.vocab_size}")
    model.eval()
    return model


def model_table(**overrides) -> str:
    """Markdown table of every registered variant with its parameter count (total, and without embeddings)."""
    rows = ["| variant | arch | options | parameters | non-embedding |", "|---|---|---|---:|---:|"]
    for name, variant in VARIANTS.items():
        model = build_model(ModelConfig(**{**overrides, **variant}))
        total = model.num_params()
        emb = model.wte.weight.numel() + (0 if model.config.tie_embeddings else model.lm_head.weight.numel())
        options = ", ".join(f"{k}={v}" for k, v in variant.items() if k != "arch") or "-"
        rows.append(f"| {name} | {variant['arch']} | {options} | {total:,} | {total - emb:,} |")
    return "\n".join(rows)
