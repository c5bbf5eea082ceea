"""finemoe's model: a Qwen2 decoder whose MLPs are dense or fine-grained mixtures of experts."""

from moe.config import ExpertBackend, ModelConfig
from moe.model import ModelOutput, Qwen2MoEForCausalLM

__all__ = ["ExpertBackend", "ModelConfig", "ModelOutput", "Qwen2MoEForCausalLM"]
