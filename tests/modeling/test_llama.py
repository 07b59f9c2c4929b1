"""Pieces of the Llama modules with a hand-written backward or a shape-dependent path, against
autodiff or NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difflora_jax.modeling.llama import FEW_ROWS, MATVEC_ROWS, Embedding, Projection, swiglu
from difflora_jax.parallel import MeshConfig, make_mesh, use_mesh


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


@pytest.mark.parametrize(
    "shape", [(1, 1), (4, 1), (2, FEW_ROWS // 2), (3, 1, 5), (2, FEW_ROWS // 2 + 1), (3, 40)]
)
def test_tied_lm_head_equals_numpy_on_either_side_of_the_few_rows_switch(shape):
    """A decoding step (few rows, table-first product) and a sequence (row-first) both give
    x @ table.T in float32 rounding of the float64 product, in the input's layout."""
    embed = Embedding(300, 24, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).standard_normal((*shape, 24)).astype(np.float32)
    got = np.asarray(jax.jit(embed.attend)(jnp.asarray(x)))
    want = x.astype(np.float64) @ np.asarray(embed.embedding[...], np.float64).T
    assert got.shape == (*shape, 300) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _rowwise(fn, *args) -> bool:
    """Whether ``fn`` traces to a loop of one-row products (a scan around a single dot)."""
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return "scan[" in jaxpr and jaxpr.count("dot_general") == 1


@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (4, 1), (2, 3), (7, 1), (2, 5)])
def test_projection_equals_numpy_on_either_side_of_the_matvec_rows_switch(lead):
    """A projection of 3-6 rows (a decoding step at batch 3-6) runs a loop of one-row
    products on the CPU, any other row count one matmul; both give x @ W in float32 rounding of
    the float64 product, in the [..., *out] layout. Under a mesh it is always one matmul."""
    proj = Projection(
        (24,), (3, 8), ("embed",), ("heads", "head_dim"), dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    x = jnp.asarray(np.random.default_rng(2).standard_normal((*lead, 24)), jnp.float32)
    rows = int(np.prod(lead))
    got = np.asarray(jax.jit(proj)(x))
    want = np.asarray(x, np.float64) @ np.asarray(proj.kernel[...], np.float64).reshape(24, 24)
    assert got.shape == (*lead, 3, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got.reshape(*lead, 24), want, rtol=1e-5, atol=1e-6)
    assert _rowwise(proj, x) == (rows in MATVEC_ROWS and jax.default_backend() == "cpu")
    with use_mesh(make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])):
        assert not _rowwise(proj, x)
