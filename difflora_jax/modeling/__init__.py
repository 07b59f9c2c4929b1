"""Flax NNX modules: the Llama-family decoder and its attention."""

from difflora_jax.modeling.attention import (
    BACKENDS,
    KVCache,
    attention,
    differential_attention,
    make_attention_mask,
)
from difflora_jax.modeling.llama import LlamaForCausalLM

__all__ = [
    "BACKENDS",
    "KVCache",
    "LlamaForCausalLM",
    "attention",
    "differential_attention",
    "make_attention_mask",
]
