"""difflora_jax: DiffLoRA (differential attention through low-rank adapters) in JAX / Flax NNX."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.modeling.adapters import AdapterParam, apply_adapters
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.protocols import Tokenizer

if TYPE_CHECKING:
    from difflora_jax.generation import Generation

__version__ = "0.1.0"


def load_model(
    source: Any, dtype: str = "float32", **kwargs: Any
) -> tuple[LlamaForCausalLM, Tokenizer | None]:
    """Load a model and its tokenizer; see :func:`difflora_jax.weights.loading.load_model`."""
    # start-up time: the weight readers pull in Orbax, gguf and safetensors
    from difflora_jax.weights.loading import load_model as _load_model

    return _load_model(source, dtype=dtype, **kwargs)


def generate(
    model: LlamaForCausalLM, tokenizer: Tokenizer | None, prompts: Any, **kwargs: Any
) -> list[Generation]:
    """Generate text; see :func:`difflora_jax.generation.generate`."""
    # start-up time: kept out of ``import difflora_jax`` like load_model
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
