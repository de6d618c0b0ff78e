"""mixret: retrieval embeddings from masked mixers."""
from mixret.models import ModelConfig, build_model, load

__version__ = "0.1.0"
__all__ = ["ModelConfig", "build_model", "load", "__version__"]
