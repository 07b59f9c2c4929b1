"""Model FLOPs of a train step and of a prefill, and the matmul FLOP/s this machine reaches.

The formula (one multiply-add = 2 FLOPs; only matmuls count; norms, RoPE, softmax and the
optimizer are left out, as is usual for model FLOP utilisation):

* per token and layer, frozen base projections ``N_base = E*H*d + 2*E*K*d + H*d*E + 3*E*M``
  (q, k, v, o, gate, up, down): forward ``2 N_base``, backward ``2 N_base`` (the gradient of
  the activations only: frozen weights get no weight gradient);
* adapters (every ``AdapterParam`` with two or more axes, ``N_adapter`` per layer): forward
  ``2 N_adapter``, backward ``4 N_adapter`` (activations and weights);
* attention, per sequence and layer, over the causal pairs ``T (T + 1) / 2`` only: forward
  ``2 * d * (maps + H)`` per pair (the scores of each map, and one weighted sum of V per head),
  ``maps`` = H for a standard layer and 2H for a differential one (both maps are scored; their
  difference weighs the shared V once: the model's arithmetic. The XLA kernel of
  ``attention.differential_attention`` weighs V with each map forward, to keep ``P1 V`` and
  ``P2 V`` for its backward: H more products per pair that it does and the formula, counting
  the model's FLOPs, does not); backward twice the forward;
* LM head ``2 E V`` per token forward, ``2 E V`` backward (activations only; the embedding is
  frozen).

A prefill counts the forward terms only, with the LM head at the last position alone.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from difflora_jax.config import ModelConfig
from difflora_jax.modeling.adapters import adapter_state, is_differential
from difflora_jax.modeling.llama import LlamaForCausalLM


def base_params_per_layer(config: ModelConfig) -> int:
    """``N_base``: the frozen projection weights of one decoder layer."""
    e, h, k, d, m = (
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
    )
    return e * h * d + 2 * e * k * d + h * d * e + 3 * e * m


def adapter_matrix_params(model: LlamaForCausalLM) -> int:
    """Adapter parameters that enter matmuls (two or more axes), summed over the layers."""
    return sum(
        math.prod(v.get_value().shape)
        for _, v in nnx.to_flat_state(adapter_state(model))
        if len(v.get_value().shape) >= 2
    )


def attention_products(model: LlamaForCausalLM) -> int:
    """Per-head products of ``d``-vectors per query-key pair, summed over the layers: scores
    and one weighted sum of V per head, 2H per standard layer and 3H per differential one (two
    maps scored, their difference weighing V once)."""
    h = model.config.num_heads
    return sum(3 * h if is_differential(layer.attn) else 2 * h for layer in model.layers)


def _attention_forward(model: LlamaForCausalLM, batch: int, length: int, causal: bool) -> float:
    pairs = length * (length + 1) / 2 if causal else length * length
    return batch * pairs * 2 * model.config.head_dim * attention_products(model)


def train_step_flops(
    model: LlamaForCausalLM, batch: int, length: int, *, causal: bool = True
) -> float:
    """Model FLOPs of one train step over ``batch x length`` tokens (module docstring).
    ``causal=False`` counts every query-key pair, as a dense attention kernel computes them."""
    c = model.config
    tokens = batch * length
    dense = c.num_layers * 4 * base_params_per_layer(c) + 6 * adapter_matrix_params(model)
    head = 4 * c.hidden_size * c.vocab_size
    return tokens * (dense + head) + 3 * _attention_forward(model, batch, length, causal)


def prefill_flops(
    model: LlamaForCausalLM, batch: int, length: int, *, causal: bool = True
) -> float:
    """Model FLOPs of a forward pass over ``batch x length`` prompt tokens (logits at the last
    position only); ``causal`` as in ``train_step_flops``."""
    c = model.config
    dense = c.num_layers * 2 * base_params_per_layer(c) + 2 * adapter_matrix_params(model)
    head = 2 * c.hidden_size * c.vocab_size * batch
    return batch * length * dense + head + _attention_forward(model, batch, length, causal)


def measured_matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a jitted ``size``-cubed matmul on the default device, best of ``repeats`` (the
    denominator of model FLOP utilisation: what this machine's matmuls reach)."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (size, size), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype)
    chain = 8  # several products per call, so dispatch overhead does not count

    @jax.jit
    def product(a, b):
        for _ in range(chain):
            a = (a @ b) * jnp.asarray(1.0 / size, dtype)
        return a

    jax.block_until_ready(product(a, b))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(a, b))
        best = min(best, time.perf_counter() - start)
    return chain * 2 * size**3 / best
