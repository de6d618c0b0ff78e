"""mixret: retrieval embeddings from masked mixers."""
from mixret.models import ModelConfig, build_model, load
from mixret.version import __version__

__all__ = ["ModelConfig", "build_model", "load", "__version__"]
