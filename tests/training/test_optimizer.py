"""Schedule and optimizer: the paper's linear warmup/decay, AdamW's first step, clipping, and a
float32 optimizer state holding exactly the adapter entries even over a bfloat16 base model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from difflora_jax.adapter_checkpoint import flatten
from difflora_jax.errors import ConfigError
from difflora_jax.modeling.adapters import AdapterParam
from difflora_jax.training import learning_rate, linear_warmup_decay, make_optimizer
from difflora_jax.training.config import OptimizerConfig
from tests.tiny import tiny_model


def test_linear_warmup_then_linear_decay_matches_the_closed_form():
    peak, warmup, total = 1e-4, 3, 100
    schedule = linear_warmup_decay(peak, warmup, total)
    got = np.array([float(schedule(k)) for k in range(total + 2)])
    want = [
        peak * k / warmup if k < warmup else peak * max(0.0, (total - k) / (total - warmup))
        for k in range(total + 2)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert got[0] == 0.0 and got[warmup] == pytest.approx(peak) and got[total] == 0.0
    # without warmup the first update uses the peak rate; logged steps are 1-based
    config = OptimizerConfig(learning_rate=2e-4, warmup_steps=0, total_steps=10)
    assert learning_rate(config, 1) == pytest.approx(2e-4)
    assert learning_rate(config, 10) == pytest.approx(2e-5)


def test_first_adamw_update_is_minus_lr_times_sign_and_clipping_applies_first():
    params = {"a": jnp.array([1.0, -2.0, 3.0]), "lam": jnp.array([0.5])}
    grads = {"a": jnp.array([0.3, -4.0, 0.0]), "lam": jnp.array([2.0])}
    config = OptimizerConfig(learning_rate=0.1, total_steps=10, max_grad_norm=0.0, eps=1e-8)
    tx = make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params), params)
    # step 1 with bias correction: m_hat = g, v_hat = g^2 -> update = -lr g / (|g| + eps)
    for name in params:
        g = np.asarray(grads[name])
        # float32 bias corrections (1 - 0.999 is inexact in float32) cost ~1e-5 relative
        np.testing.assert_allclose(updates[name], -0.1 * g / (np.abs(g) + 1e-8), rtol=2e-5)

    # clipping to a global norm of 1 scales the gradient before Adam: at step 1 the Adam update
    # is scale-invariant, so compare the clip stage alone through a large-eps Adam
    clipped = OptimizerConfig(learning_rate=1.0, total_steps=10, max_grad_norm=1.0, eps=1e6)
    unclipped = OptimizerConfig(learning_rate=1.0, total_steps=10, max_grad_norm=0.0, eps=1e6)
    norm = float(optax.tree.norm(grads))
    u_clip, _ = make_optimizer(clipped).update(grads, make_optimizer(clipped).init(params), params)
    u_free, _ = make_optimizer(unclipped).update(
        grads, make_optimizer(unclipped).init(params), params
    )
    np.testing.assert_allclose(u_clip["a"], np.asarray(u_free["a"]) / norm, rtol=1e-5)


def test_weight_decay_applies_to_matrices_not_lambda_vectors():
    params = {"a": jnp.ones((2, 2)), "lam": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(OptimizerConfig(learning_rate=0.1, total_steps=10, weight_decay=0.5))
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["lam"], np.zeros(2))


def test_optimizer_state_is_float32_and_holds_adapter_entries_only_over_bf16_base():
    model = tiny_model(dtype=jnp.bfloat16)
    base = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
    adapters = nnx.to_pure_dict(nnx.state(model, AdapterParam))
    adapter_paths = set(flatten(adapters))
    tx = make_optimizer(OptimizerConfig(total_steps=10))
    state = tx.init(adapters)
    flat = flatten(state)
    moments = {}
    for name, leaf in flat.items():
        if name.endswith("count"):
            assert leaf.shape == () and leaf.dtype == jnp.int32  # optax's step counters
            continue
        assert leaf.dtype == jnp.float32, name
        _, _, path = name.partition(".mu.") if ".mu." in name else name.partition(".nu.")
        moments.setdefault(name.split(".")[2], set()).add(path)
    assert moments == {"mu": adapter_paths, "nu": adapter_paths}
    # every array of the optimizer state is an adapter moment or a scalar counter
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    n_state = sum(x.size for x in jax.tree.leaves(state))
    counters = sum(1 for n in flat if n.endswith("count"))
    assert n_state == 2 * n_adapter + counters


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("learning_rate", 0.0, "'learning_rate' = 0.0"),
        ("warmup_steps", 10, "[0, total_steps = 10)"),
        ("max_grad_norm", -1.0, ">= 0"),
        ("weight_decay", -0.1, ">= 0"),
    ],
)
def test_bad_optimizer_config_names_the_field(field, value, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        make_optimizer(OptimizerConfig(total_steps=10, **{field: value}))
