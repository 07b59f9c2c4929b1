"""Pieces of the Llama modules with a hand-written backward, against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np

from difflora_jax.modeling.llama import swiglu


def test_swiglu_backward_equals_autodiff_of_silu_times_up():
    rng = np.random.default_rng(0)
    # gates over the range where silu's derivative changes sign and saturates
    gate = jnp.asarray(rng.uniform(-12, 12, (64, 48)), jnp.float32)
    up = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
    plain = lambda g, u: jnp.sum(jax.nn.silu(g) * u * weights)  # noqa: E731
    ours = lambda g, u: jnp.sum(swiglu(g, u) * weights)  # noqa: E731
    np.testing.assert_array_equal(swiglu(gate, up), jax.nn.silu(gate) * up)
    for got, want in zip(jax.grad(ours, (0, 1))(gate, up), jax.grad(plain, (0, 1))(gate, up)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
