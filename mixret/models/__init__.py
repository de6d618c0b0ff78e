"""The model zoo: `ModelConfig`, `build_model(cfg)`, `load(dir)`."""
from mixret.models.base import CausalLM, CausalLMOutput
from mixret.models.config import ARCHS, ModelConfig
from mixret.models.zoo import VARIANTS, build_model, load, model_table

__all__ = ["ARCHS", "VARIANTS", "CausalLM", "CausalLMOutput", "ModelConfig", "build_model", "load", "model_table"]
