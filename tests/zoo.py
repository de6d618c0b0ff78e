"""Tiny configurations of every architecture and mixer option, shared by the model and generation tests."""
import torch

from mixret.models import VARIANTS, ModelConfig, build_model

TINY = dict(vocab_size=260, d_model=32, n_layers=2, context=24)
# every registered variant, plus options that change the code path
CONFIGS = {name: {**TINY, **v} for name, v in VARIANTS.items()}
CONFIGS["masked-mixer (kernel 3)"] = {**TINY, "arch": "masked-mixer", "mixer_kernel": 3}
CONFIGS["masked-mixer (tied)"] = {**TINY, "arch": "masked-mixer", "tie_embeddings": True}
CONFIGS["hypermixer (2 heads, tied, chunk 5)"] = {**TINY, "arch": "hypermixer", "hyper_heads": 2,
                                                  "hyper_tied": True, "hyper_chunk": 5, "hyper_dim": 8}
CONFIGS["llama (2 heads)"] = {**TINY, "arch": "llama", "n_heads": 2}


def make(name: str):
    """The model of CONFIGS[name], seeded, in eval mode."""
    torch.manual_seed(1)
    return build_model(ModelConfig(**CONFIGS[name])).eval()
