"""Layers under ``lax.scan`` compute what the unrolled layers compute: logits, adapter
gradients with dropout on, the advanced dropout streams, every remat policy, cached decoding and
generation; adapters on a subset of layers split the stack into runs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difflora_jax.config import REMAT_POLICIES, AdapterConfig
from difflora_jax.errors import ConfigError
from difflora_jax.generation import generate_ids
from difflora_jax.modeling.adapters import apply_adapters
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.training.step import compute_gradients, split_for_training
from tests.tiny import random_batch, tiny_config
from tests.variants import difflora

CONFIG = tiny_config(num_layers=4)
ADAPTERS = {
    "lora-all-targets": AdapterConfig(
        method="lora", rank=4, alpha=8.0, dropout=0.1, targets=("q", "k", "v", "o", "up")
    ),
    "difflora-gn": difflora(dropout=0.1, group_norm=True, lora_mlp=True),
    "difflora-fixed-lambda": difflora(lambda_mode="fixed", lambda_init=0.3),
    "difflora-layers-1-2": difflora(dropout=0.1, layers=(1, 2)),
}


def _model(adapter: AdapterConfig) -> LlamaForCausalLM:
    model = apply_adapters(LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0)), adapter)
    # nonzero B everywhere, so every adapter changes the numbers
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Variable) and variable.get_value().dtype == jnp.float32:
            value = variable.get_value()
            if not np.any(np.asarray(value)):
                variable.set_value(0.05 * jax.random.normal(jax.random.key(1), value.shape))
    return model


def _gradients(model: LlamaForCausalLM, scan: bool, remat: str = "none"):
    model.set_layer_execution(scan=scan, remat=remat)
    graphdef, params, rng, rest = split_for_training(model)
    batch = {k: jnp.asarray(v) for k, v in random_batch(2, 16, vocab=CONFIG.vocab_size).items()}
    grads, loss, _, new_rng = jax.jit(compute_gradients, static_argnums=(0,))(
        graphdef, params, rng, rest, batch
    )
    return grads, loss, new_rng


def test_runs_follow_the_adapted_layers():
    model = _model(ADAPTERS["difflora-layers-1-2"])
    assert model.layer_runs() == ((0, 1), (1, 3), (3, 4))
    assert _model(ADAPTERS["difflora-gn"]).layer_runs() == ((0, 4),)
    model.set_layer_execution(scan=False)
    assert model.layer_runs() == ((0, 1), (1, 2), (2, 3), (3, 4))
    cache = _model(ADAPTERS["difflora-layers-1-2"]).init_cache(2, 8)
    kv = CONFIG.num_kv_heads
    assert [k.shape[:1] + k.shape[3:4] for k in cache.keys] == [(1, kv), (2, 2 * kv), (1, kv)]
    assert [cache.layer(i)[0].shape[2] for i in range(4)] == [kv, 2 * kv, 2 * kv, kv]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_scanned_equals_unrolled(name):
    """Logits, and the loss, adapter gradients and dropout RNG state after one training
    forward/backward with dropout on, agree to float32 rounding (1e-5)."""
    model = _model(ADAPTERS[name])
    ids = jnp.asarray(np.random.default_rng(3).integers(0, CONFIG.vocab_size, (2, 16)), jnp.int32)
    scanned_logits = model(ids)
    model.set_layer_execution(scan=False)
    np.testing.assert_allclose(model(ids), scanned_logits, rtol=1e-5, atol=1e-5)

    unrolled = _gradients(model, scan=False)
    scanned = _gradients(model, scan=True)
    np.testing.assert_allclose(scanned[1], unrolled[1], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(scanned[0]), jax.tree.leaves(unrolled[0])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(scanned[0]))
    same_rng = jax.tree.map(
        lambda a, b: (
            bool(np.array_equal(jax.random.key_data(a), jax.random.key_data(b)))
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
            else bool(np.array_equal(a, b))
        ),
        scanned[2],
        unrolled[2],
    )
    assert all(jax.tree.leaves(same_rng))


@pytest.mark.parametrize("remat", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_changes_memory_not_numbers(remat):
    model = _model(ADAPTERS["difflora-gn"])
    want = _gradients(model, scan=True)
    got = _gradients(model, scan=True, remat=remat)
    for g, w in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0])):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    got_unrolled = _gradients(model, scan=False, remat=remat)
    for g, w in zip(jax.tree.leaves(got_unrolled[0]), jax.tree.leaves(want[0])):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_an_unknown_remat_policy_is_refused():
    with pytest.raises(ConfigError, match="remat 'some' is not one of"):
        _model(ADAPTERS["difflora-gn"]).set_layer_execution(remat="some")


@pytest.mark.parametrize("name", ["difflora-gn", "difflora-layers-1-2"])
def test_generation_is_the_same_scanned_and_unrolled(name):
    model = _model(dataclasses.replace(ADAPTERS[name], dropout=0.0))
    prompts = [[5, 9, 2, 7, 1], [3, 3, 8]]
    scanned = generate_ids(model, prompts, max_new_tokens=12, chunk_size=4)
    model.set_layer_execution(scan=False)
    assert generate_ids(model, prompts, max_new_tokens=12, chunk_size=4) == scanned


@pytest.mark.parametrize("name", ["difflora-gn", "difflora-layers-1-2"])
def test_a_cached_forward_calling_each_layer_equals_the_scan(name):
    """``forward(scan=False)`` calls each layer on its own weights against the scanned
    layout's cache (generation instead runs a view with ``scan`` off, so its cache is per
    layer too; ``test_generation`` covers that path): a prefill and then one decoding step give the scan's logits and
    cache (1e-5), the step's logits equal the last position of an uncached forward, and no
    slot past the written ones changes."""
    model = _model(dataclasses.replace(ADAPTERS[name], dropout=0.0))
    ids = jnp.asarray(np.random.default_rng(5).integers(0, CONFIG.vocab_size, (2, 6)), jnp.int32)
    ones = jnp.ones_like(ids)
    positions = jnp.broadcast_to(jnp.arange(6), ids.shape)
    outputs = {}
    for scan in (True, False):
        cache = model.init_cache(2, 9)
        first, cache = model.forward(
            ids[:, :5], ones[:, :5], positions=positions[:, :5], cache=cache, scan=scan
        )
        step, cache = model.forward(
            ids[:, 5:], ones[:, 5:], positions=positions[:, 5:], cache=cache, scan=scan
        )
        outputs[scan] = (first, step, cache)
    assert outputs[True][2] is not None and outputs[False][2] is not None
    for got, want in zip(jax.tree.leaves(outputs[False]), jax.tree.leaves(outputs[True])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs[False][1][:, 0], model(ids)[:, -1], rtol=1e-5, atol=1e-5)
    for keys, values in zip(outputs[False][2].keys, outputs[False][2].values):
        assert np.all(np.asarray(keys[:, :, 6:]) == 0) and np.all(np.asarray(values[:, :, 6:]) == 0)
        assert np.abs(np.asarray(keys[:, :, :6])).max(axis=(0, 1, 3, 4)).min() > 0  # every slot
    assert int(outputs[False][2].index) == 6
