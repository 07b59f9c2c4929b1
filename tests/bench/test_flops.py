"""The FLOP formula of ``modeling.flops`` against XLA's own count of the compiled computation
(``cost_analysis``) on a model whose matmuls dominate: dense attention (XLA computes every
query-key pair, so the formula counts them all with ``causal=False``), unrolled layers (XLA
counts a loop body once), no dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from difflora_jax.config import AdapterConfig
from difflora_jax.losses import batch_loss
from difflora_jax.modeling.adapters import AdapterParam, apply_adapters, is_differential
from difflora_jax.modeling.flops import measured_matmul_flops, prefill_flops, train_step_flops
from difflora_jax.modeling.llama import LlamaForCausalLM
from tests.tiny import random_batch, tiny_config
from tests.variants import difflora

# wide enough that norms, RoPE and softmax are a few percent of the matmuls
CONFIG = tiny_config(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    num_layers=2,
)
METHODS = {
    "lora": AdapterConfig(method="lora", rank=8, alpha=16.0),
    "difflora": difflora(rank=8, alpha=16.0),
}
BATCH, LENGTH = 2, 64


def _model(adapter: AdapterConfig) -> LlamaForCausalLM:
    model = apply_adapters(LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0)), adapter)
    model.set_attention_backend("xla", causal_block=None)
    model.set_layer_execution(scan=False)
    return model


def _kernel_extra(model: LlamaForCausalLM) -> int:
    """Work the differential kernel does beyond the model's arithmetic that the formula counts:
    forward, each map weighs V (``P1 V`` and ``P2 V``, kept for the backward's row terms)
    where the model needs one product of their difference: one more ``[T, T] x [T, d]``
    product per head and differential layer (every pair, as with ``causal=False``)."""
    c = model.config
    layers = sum(is_differential(layer.attn) for layer in model.layers)
    return layers * BATCH * LENGTH * LENGTH * 2 * c.head_dim * c.num_heads


def _xla_flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


@pytest.mark.parametrize("method", list(METHODS))
def test_prefill_formula_matches_xla(method):
    model = _model(METHODS[method])
    graphdef, state = nnx.split(model)
    ids = jnp.zeros((BATCH, LENGTH), jnp.int32)

    def forward(state, ids):
        return nnx.merge(graphdef, state).forward(ids, last_only=True)[0]

    counted = _xla_flops(forward, state, ids)
    formula = prefill_flops(model, BATCH, LENGTH, causal=False) + _kernel_extra(model)
    assert formula <= counted <= 1.06 * formula, (counted, formula)
    assert prefill_flops(model, BATCH, LENGTH) < formula  # causal pairs only


@pytest.mark.parametrize("method", list(METHODS))
def test_train_formula_matches_xla(method):
    model = _model(METHODS[method])
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)
    batch = {k: jnp.asarray(v) for k, v in random_batch(BATCH, LENGTH, vocab=256).items()}

    def loss(params, rest, batch):
        return batch_loss(nnx.merge(graphdef, params, rest), batch)[0]

    counted = _xla_flops(jax.grad(loss), params, rest, batch)
    formula = train_step_flops(model, BATCH, LENGTH, causal=False)
    # Work the formula counts that XLA drops as dead: the embedding is frozen, so nothing
    # needs the gradient of layer 0's input through its q, k, v projections, nor (with no
    # adapter on v) the gradient of layer 0's values (the P^T dO product: one per head, of the
    # combined map (P1 - lambda P2) in a differential layer). And the differential kernel's
    # work beyond the formula (_kernel_extra) is added.
    c = CONFIG
    dead = BATCH * LENGTH * 2 * c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    if method == "difflora":
        dead += BATCH * LENGTH * LENGTH * 2 * c.head_dim * c.num_heads
    expected = formula - dead + _kernel_extra(model)
    assert expected <= counted <= 1.03 * expected, (counted, expected)


def test_the_measured_matmul_rate_is_positive_and_finite():
    rate = measured_matmul_flops(size=128, repeats=2)
    assert 1e6 < rate < 1e16
