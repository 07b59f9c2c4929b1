"""difflora_jax: DiffLoRA (differential attention through low-rank adapters) in JAX / Flax NNX."""

from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.modeling.adapters import AdapterParam, apply_adapters
from difflora_jax.modeling.llama import LlamaForCausalLM

__version__ = "0.1.0"


def load_model(source, dtype="float32", **kwargs):
    """Load a model and its tokenizer; see :func:`difflora_jax.weights.load_model`."""
    from difflora_jax.weights.loading import load_model as _load_model

    return _load_model(source, dtype=dtype, **kwargs)


def generate(model, tokenizer, prompts, **kwargs):
    """Generate text; see :func:`difflora_jax.generation.generate`."""
    from difflora_jax.generation import generate as _generate

    return _generate(model, tokenizer, prompts, **kwargs)


__all__ = [
    "AdapterConfig",
    "AdapterParam",
    "LlamaForCausalLM",
    "ModelConfig",
    "__version__",
    "apply_adapters",
    "generate",
    "load_model",
]
