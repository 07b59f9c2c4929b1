"""Weights in and out: HF safetensors directories, GGUF files, aliases of packaged models."""

from difflora_jax.weights.loading import ALIASES, build_model, load_model, resolve_source

__all__ = ["ALIASES", "build_model", "load_model", "resolve_source"]
