"""The train step: token-weighted loss equal to a float64 reference, gradient accumulation equal
to one big batch, frozen base weights bit-identical after training, lambda metrics, NaN guard."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difflora_jax.adapter_checkpoint import flatten
from difflora_jax.config import AdapterConfig
from difflora_jax.losses import batch_logits
from difflora_jax.modeling.adapters import AdapterParam, lambda_layers, lambda_values, write_back
from difflora_jax.training import compute_gradients, make_optimizer, split_for_training, train_step
from difflora_jax.training.config import OptimizerConfig
from difflora_jax.training.step import _micro_loss_sum as micro_loss_sum
from difflora_jax.training.step import _train_step as train_step_fn  # the function jit compiles
from tests.tiny import DIFFLORA, random_batch, tiny_config, tiny_model

_grads = jax.jit(compute_gradients, static_argnames=("graphdef", "grad_accum_steps"))


def _reference_loss(logits: np.ndarray, batch) -> tuple[float, float]:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(np.float64)
    return float((nll * mask).sum() / mask.sum()), float(mask.sum())


def test_loss_matches_reference_and_accumulation_equals_one_big_batch():
    model = tiny_model()
    batch = random_batch(4, 32, seed=3)
    graphdef, params, rng, rest = split_for_training(model)
    g1, loss1, tokens1, _ = _grads(graphdef, params, rng, rest, batch, grad_accum_steps=1)
    g2, loss2, tokens2, _ = _grads(graphdef, params, rng, rest, batch, grad_accum_steps=2)

    logits = nnx.jit(batch_logits)(model, batch)
    want_loss, want_tokens = _reference_loss(logits, batch)
    assert loss1.dtype == jnp.float32
    assert float(tokens1) == float(tokens2) == want_tokens == batch["loss_mask"].sum()
    assert float(loss1) == pytest.approx(want_loss, rel=1e-6)
    assert float(loss2) == pytest.approx(want_loss, rel=1e-6)

    # micro-batches hold different numbers of loss tokens, so a mean of per-micro-batch means
    # would differ: weighting by tokens is what makes accumulation exact
    halves = [
        _reference_loss(logits[i : i + 2], {k: v[i : i + 2] for k, v in batch.items()})
        for i in (0, 2)
    ]
    assert halves[0][1] != halves[1][1]
    assert abs((halves[0][0] + halves[1][0]) / 2 - want_loss) > 1e-4

    flat1, flat2 = flatten(g1), flatten(g2)
    assert set(flat1) == set(flatten(nnx.to_pure_dict(nnx.state(model, AdapterParam))))
    for name in flat1:
        np.testing.assert_allclose(flat2[name], flat1[name], rtol=2e-5, atol=1e-9, err_msg=name)
    assert max(float(jnp.max(jnp.abs(g))) for g in flat1.values()) > 1e-4  # real gradients


@pytest.fixture(scope="module")
def bf16_run():
    """A bfloat16 base with dropout-0.1 DiffLoRA adapters, its split and one compiled step."""
    adapter = dataclasses.replace(DIFFLORA, dropout=0.1)
    model = tiny_model(adapter, dtype=jnp.bfloat16)
    optimizer = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    return model, optimizer


def test_base_weights_are_bit_identical_after_training_and_lambda_is_reported(bf16_run):
    model, optimizer = bf16_run
    base_before = [
        (path, np.array(v[...])) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    ]
    adapters_before = flatten(nnx.to_pure_dict(nnx.state(model, AdapterParam)))
    graphdef, params, rng, rest = split_for_training(model)
    opt_state = make_optimizer(optimizer).init(params)
    losses = []
    for step in range(3):
        batch = random_batch(4, 32, seed=10 + step)
        params, opt_state, rng, metrics = train_step(
            graphdef, params, opt_state, rng, rest, batch, optimizer=optimizer
        )
        losses.append(float(metrics["loss"]))
        assert bool(metrics["finite"]) and metrics["loss"].dtype == jnp.float32
        assert int(metrics["tokens"]) == batch["loss_mask"].sum()
        assert int(metrics["input_tokens"]) == (batch["segment_ids"] > 0).sum()
        assert float(metrics["grad_norm"]) > 0
    write_back(model, params, rng)

    base_after = dict(
        (path, np.array(v[...])) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    )
    assert len(base_after) == len(base_before) > 0
    for path, before in base_before:
        assert base_after[path].dtype == jnp.bfloat16
        assert np.array_equal(base_after[path], before), path
    adapters_after = flatten(nnx.to_pure_dict(nnx.state(model, AdapterParam)))
    changed = [
        n for n in adapters_before if not np.array_equal(adapters_before[n], adapters_after[n])
    ]
    assert len(changed) == len(adapters_before)  # lr 1e-2: every adapter moved
    assert all(x.dtype == jnp.float32 for x in adapters_after.values())
    # the lambda metric is the updated model's lambda per differential layer
    assert lambda_layers(model) == (0, 1)
    np.testing.assert_allclose(metrics["lambda"], lambda_values(model), rtol=1e-6)
    # dropout streams advanced: one draw per dropout module per step
    counts = [int(c) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))]
    assert counts and set(counts) == {3}
    assert len(set(losses)) == 3


def test_dropout_rng_makes_steps_differ_and_same_state_repeats_exactly(bf16_run):
    model, optimizer = bf16_run
    graphdef, params, rng, rest = split_for_training(model)
    opt_state = make_optimizer(optimizer).init(params)
    batch = random_batch(4, 32, seed=20)

    def run(r):
        return train_step(graphdef, params, opt_state, r, rest, batch, optimizer=optimizer)

    a, b = run(rng), run(rng)
    assert float(a[3]["loss"]) == float(b[3]["loss"])
    for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
        assert np.array_equal(x, y)
    c = run(a[2])  # advanced dropout state: other masks
    assert float(c[3]["loss"]) != float(a[3]["loss"])


def test_non_finite_loss_skips_the_update(bf16_run):
    model, optimizer = bf16_run
    graphdef, params, rng, rest = split_for_training(model)
    opt_state = make_optimizer(optimizer).init(params)
    poisoned = jax.tree.map(lambda x: x, params)
    poisoned["layers"][0]["attn"]["negative_q"]["a"] = jnp.full_like(
        params["layers"][0]["attn"]["negative_q"]["a"], jnp.nan
    )
    batch = random_batch(4, 32, seed=30)
    new_params, new_opt, _, metrics = train_step(
        graphdef, poisoned, opt_state, rng, rest, batch, optimizer=optimizer
    )
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    for x, y in zip(jax.tree.leaves(new_params), jax.tree.leaves(poisoned)):
        np.testing.assert_array_equal(x, y)  # NaNs compare equal here
    for x, y in zip(jax.tree.leaves(new_opt), jax.tree.leaves(opt_state)):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# the compiled step differentiates with respect to the adapters only

# Distinct sizes, so that a frozen weight's shape cannot be mistaken for an activation's.
HLO_CONFIG = tiny_config(
    vocab_size=72, hidden_size=40, num_heads=2, num_kv_heads=1, head_dim=12, intermediate_size=56
)


def _weight_shaped_results(hlo: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """HLO dot/convolution/scatter instructions whose result has one of ``shapes``."""
    found = []
    for line in hlo.splitlines():
        match = re.search(r"= f32\[([0-9,]*)\]\S* (dot|convolution|scatter)\(", line)
        if match and tuple(int(d) for d in match.group(1).split(",") if d) in shapes:
            found.append(line.strip()[:120])
    return found


def _frozen_shapes(model) -> set[tuple[int, ...]]:
    """Every frozen weight's shape, as stored and as the 2-D matrix a gradient dot would give."""
    shapes = set()
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(variable.get_value().shape)
        if len(shape) < 2:
            continue  # norm scales: their gradient is a reduction, not a weight-shaped dot
        shapes.add(shape)
        for cut in range(1, len(shape)):
            rows, cols = int(np.prod(shape[:cut])), int(np.prod(shape[cut:]))
            shapes |= {(rows, cols), (cols, rows)}
    return shapes


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("method", ["lora", "difflora"])
def test_the_step_computes_no_gradient_of_a_frozen_weight(method, scan):
    model = tiny_model(AdapterConfig(method=method, rank=4, alpha=8.0), config=HLO_CONFIG)
    model.set_layer_execution(scan=scan)  # scanned: the per-layer dots inside the loop body
    graphdef, params, rng, rest = split_for_training(model)
    optimizer = OptimizerConfig(total_steps=10)
    opt_state = make_optimizer(optimizer).init(params)
    batch = {k: jnp.asarray(v) for k, v in random_batch(2, 8, vocab=72).items()}
    step = jax.jit(train_step_fn, static_argnames=("graphdef", "optimizer", "grad_accum_steps"))
    hlo = (
        step.lower(graphdef, optimizer, 1, params, opt_state, rng, rest, batch)
        .compiler_ir(dialect="hlo")
        .as_hlo_text()
    )
    frozen = _frozen_shapes(model)
    assert _weight_shaped_results(hlo, frozen) == []
    # the check is not vacuous: differentiating the frozen weights too shows them
    everything = jax.jit(
        jax.grad(micro_loss_sum, argnums=(0, 2), has_aux=True), static_argnames=("graphdef",)
    )
    hlo_all = (
        everything.lower(params, rng, rest, batch, graphdef=graphdef)
        .compiler_ir(dialect="hlo")
        .as_hlo_text()
    )
    assert len(_weight_shaped_results(hlo_all, frozen)) >= 7  # q, k, v, o, gate, up, down
