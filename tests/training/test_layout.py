"""The stacked layout of the train step (``training.layout``): conversions that lose nothing, a
stacked step equal to the per-layer one (gradients, AdamW with weight decay, dropout streams,
lambda), and a compiled step whose size does not grow with the number of layers."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from difflora_jax.adapter_checkpoint import flatten
from difflora_jax.training import make_optimizer, split_for_training, train_step
from difflora_jax.training.config import OptimizerConfig
from difflora_jax.training.layout import (
    RUNS_KEY,
    scanned_runs,
    stack_layers,
    to_per_layer,
    to_stacked,
    unstack_layers,
)
from difflora_jax.training.optimizer import decay_mask
from difflora_jax.training.step import _train_step
from tests.tiny import BYTE_TINY, DIFFLORA, random_batch, tiny_model


def _layers(n: int):
    """The training tests' tiny model with ``n`` layers (one scanned run)."""
    return dataclasses.replace(BYTE_TINY, num_layers=n)


def _np(x) -> np.ndarray:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def _assert_trees_equal(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if tolerance:
            np.testing.assert_allclose(_np(x), _np(y), **tolerance)
        else:
            np.testing.assert_array_equal(_np(x), _np(y))


def test_stacking_params_and_optimizer_state_round_trips():
    model = tiny_model(config=_layers(4))
    runs = scanned_runs(model)
    assert runs == ((0, 4),)
    _, params, _, _ = split_for_training(model)
    stacked = to_stacked(params, runs)
    assert set(stacked) == {RUNS_KEY}
    lora_a = stacked[RUNS_KEY][(0, 4)]["attn"]["q_proj"]["lora"]["a"]
    assert lora_a.shape == (4, *params["layers"][0]["attn"]["q_proj"]["lora"]["a"].shape)
    np.testing.assert_array_equal(lora_a[2], params["layers"][2]["attn"]["q_proj"]["lora"]["a"])
    _assert_trees_equal(to_per_layer(stacked), params)

    # Adam's moments inside the optax state convert with the parameters they shadow
    tx = make_optimizer(OptimizerConfig(total_steps=10))
    state = tx.init(params)
    _assert_trees_equal(to_per_layer(stack_layers(state, runs)), state)
    _assert_trees_equal(stack_layers(state, runs), tx.init(stacked))


def test_layers_of_another_structure_stay_per_layer():
    # adapters on layers 1-2 only: layer 0 and 3 (no adapters) run on their own, 1-2 as a scan
    adapter = dataclasses.replace(DIFFLORA, layers=(1, 2))
    model = tiny_model(adapter, config=_layers(4))
    assert model.layer_runs() == ((0, 1), (1, 3), (3, 4))
    _, params, _, _ = split_for_training(model)
    stacked = stack_layers(params, scanned_runs(model))
    assert list(stacked) == [RUNS_KEY] and list(stacked[RUNS_KEY]) == [(1, 3)]
    _assert_trees_equal(unstack_layers(stacked), params)


def test_weight_decay_masks_the_same_parameters_in_both_layouts():
    model = tiny_model()
    _, params, _, _ = split_for_training(model)
    mask = decay_mask(stack_layers(params, scanned_runs(model)))
    assert unstack_layers(mask, lambda m, n: [m] * n) == decay_mask(params)
    flat = flatten(decay_mask(params))
    assert flat["layers.0.attn.lambda_q1"] is False  # a vector, stacked into a matrix
    assert flat["layers.0.attn.negative_q.a"] is True


@pytest.mark.parametrize("stack_rng", [True, False], ids=["params-and-rng", "params-only"])
def test_a_stacked_step_equals_the_per_layer_step(stack_rng):
    # dropout on (the RNG streams advance inside the scan), weight decay on (masked by rank),
    # two micro-batches, three steps; the loop stacks the dropout streams too
    adapter = dataclasses.replace(DIFFLORA, dropout=0.1)
    model = tiny_model(adapter, config=_layers(3))
    optimizer = OptimizerConfig(
        learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.1
    )
    graphdef, params, rng, rest = split_for_training(model)
    runs = scanned_runs(model)
    assert runs == ((0, 3),)
    tx = make_optimizer(optimizer)
    per_layer = (params, tx.init(params), rng)
    stacked_rng = stack_layers(rng, runs) if stack_rng else rng
    stacked = (stack_layers(params, runs), tx.init(stack_layers(params, runs)), stacked_rng)
    for step in range(3):
        batch = random_batch(4, 32, seed=step)
        out = {}
        for name, (p, o, r) in (("per_layer", per_layer), ("stacked", stacked)):
            out[name] = train_step(
                graphdef, p, o, r, rest, batch, optimizer=optimizer, grad_accum_steps=2
            )
        per_layer, stacked = out["per_layer"][:3], out["stacked"][:3]
        metrics_a, metrics_b = out["per_layer"][3], out["stacked"][3]
        assert bool(metrics_a["finite"]) and bool(metrics_b["finite"])
        # the same operations in another order of summation: float32 rounding apart
        for key in ("loss", "grad_norm", "lambda"):
            np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=1e-5, err_msg=key)
        _assert_trees_equal(unstack_layers(stacked[0]), per_layer[0], rtol=1e-5, atol=1e-7)
        _assert_trees_equal(unstack_layers(stacked[1]), per_layer[1], rtol=1e-5, atol=1e-7)
        _assert_trees_equal(unstack_layers(stacked[2]), per_layer[2])  # the dropout streams
        assert (RUNS_KEY in stacked[2]) == stack_rng
    # the adapters moved (the comparison is not between two unchanged states)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), per_layer[0], params)
    assert max(jax.tree.leaves(moved)) > 1e-3
    counts = [int(c) for c in jax.tree.leaves(per_layer[2]) if c.dtype == np.uint32]
    assert counts and min(counts) > 0  # and the dropout streams advanced


def _step_size(layers: int, stacked: bool) -> int:
    """Lines of the lowered (StableHLO) train step of a tiny DiffLoRA model with dropout."""
    model = tiny_model(dataclasses.replace(DIFFLORA, dropout=0.1), config=_layers(layers))
    graphdef, params, rng, rest = split_for_training(model)
    if stacked:
        params, rng = stack_layers((params, rng), scanned_runs(model))
    optimizer = OptimizerConfig(total_steps=10)
    opt_state = make_optimizer(optimizer).init(params)
    batch = random_batch(2, 16)
    lowered = jax.jit(_train_step, static_argnums=(0, 1, 2)).lower(
        graphdef, optimizer, 1, params, opt_state, rng, rest, batch
    )
    return len(lowered.as_text().splitlines())


def test_the_stacked_step_does_not_grow_with_the_layers():
    per_layer = _step_size(6, False) - _step_size(2, False)
    stacked = _step_size(6, True) - _step_size(2, True)
    # per layer, the optimizer and the gradients' unstacking add operations for every array of
    # every layer; stacked, four more layers add only the per-layer reads of lambda (metrics)
    # and the layers' slices that the model's graph still holds
    assert per_layer > 0
    assert stacked < per_layer / 3, (stacked, per_layer)


def test_stacked_params_keep_their_shardings():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    model = tiny_model(config=_layers(3))
    _, params, _, _ = split_for_training(model)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, replicated)
    stacked = to_stacked(params, scanned_runs(model))
    for leaf in jax.tree.leaves(stacked):
        assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
        assert leaf.sharding.spec[0] is None
    back = to_per_layer(stacked)
    _assert_trees_equal(back, params)
    assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(back))


def test_nnx_state_of_the_model_is_untouched_by_a_stacked_step():
    model = tiny_model(config=_layers(3))
    before = jax.tree.map(_np, nnx.to_pure_dict(nnx.state(model)))
    graphdef, params, rng, rest = split_for_training(model)
    stacked = stack_layers(params, scanned_runs(model))
    optimizer = OptimizerConfig(total_steps=10)
    train_step(
        graphdef,
        stacked,
        make_optimizer(optimizer).init(stacked),
        rng,
        rest,
        random_batch(2, 16),
        optimizer=optimizer,
    )
    _assert_trees_equal(jax.tree.map(_np, nnx.to_pure_dict(nnx.state(model))), before)
