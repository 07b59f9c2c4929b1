"""Adapter dropout's counter-hash masks: PEFT's dropout in distribution.

Statistical checks at sizes where the binomial standard deviation is small: the drop rate, the
1/(1-p) scaling, and independence (pair frequencies equal to products of the rates) between
neighbouring elements, between consecutive calls of one adapter and between two adapters.
Tolerances are 6 standard deviations of the estimate (a false failure about once in 10**9).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difflora_jax.modeling.dropout import AdapterDropout, hash_keep_mask, set_mask_generator


def _within(estimate: float, expected: float, n: int) -> None:
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert abs(estimate - expected) < 6 * sigma, (estimate, expected, sigma)


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_drop_rate(rate):
    keep = np.asarray(hash_keep_mask(jax.random.key(3), (8, 512, 576), rate))
    _within(1 - keep.mean(), rate, keep.size)
    # no row or column is special: per-column and per-row rates stay within their own bounds
    per_column = 1 - keep.reshape(-1, 576).mean(axis=0)
    per_row = 1 - keep.reshape(-1, 576).mean(axis=1)
    assert np.abs(per_column - rate).max() < 6 * math.sqrt(rate * (1 - rate) / 4096)
    assert np.abs(per_row - rate).max() < 6.5 * math.sqrt(rate * (1 - rate) / 576)


def test_neighbours_are_independent():
    rate = 0.1
    drop = ~np.asarray(hash_keep_mask(jax.random.key(0), (2048, 1536), rate))
    for a, b in (
        (drop[:, :-1], drop[:, 1:]),  # next column
        (drop[:-1], drop[1:]),  # next row
        (drop[:, :-7], drop[:, 7:]),
        (drop[:-1, :-1], drop[1:, 1:]),
    ):
        _within(float((a & b).mean()), rate * rate, a.size)


def test_calls_and_adapters_draw_independent_masks():
    rate = 0.1
    rngs = nnx.Rngs(dropout=0)
    first, second = AdapterDropout(rate, rngs=rngs), AdapterDropout(rate, rngs=rngs)
    set_mask_generator(first, "hash")
    set_mask_generator(second, "hash")
    x = jnp.ones((1024, 1024), jnp.float32)
    a = np.asarray(first(x, deterministic=False)) == 0
    b = np.asarray(first(x, deterministic=False)) == 0  # the stream advanced: a new mask
    c = np.asarray(second(x, deterministic=False)) == 0
    for left, right in ((a, b), (a, c), (b, c)):
        assert not np.array_equal(left, right)
        _within(float((left & right).mean()), rate * rate, left.size)


def test_scaling_and_determinism():
    rate = 0.25
    x = jax.random.normal(jax.random.key(1), (64, 300), jnp.float32)
    module = AdapterDropout(rate, rngs=nnx.Rngs(dropout=5))
    out = np.asarray(module(x, deterministic=False))
    kept = out != 0
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    # the same key gives the same mask; deterministic mode is the identity
    key = jax.random.key(9)
    np.testing.assert_array_equal(
        hash_keep_mask(key, (64, 300), rate), hash_keep_mask(key, (64, 300), rate)
    )
    np.testing.assert_array_equal(module(x), x)


def test_bernoulli_generator_is_nnx_dropout():
    """The ``bernoulli`` setting draws exactly nnx.Dropout's mask from the same stream."""
    x = jnp.ones((16, 32), jnp.float32)
    ours = AdapterDropout(0.3, rngs=nnx.Rngs(dropout=2))
    set_mask_generator(ours, "bernoulli")
    theirs = nnx.Dropout(0.3, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(ours(x, deterministic=False), theirs(x, deterministic=False))


def test_unknown_generator_is_refused():
    with pytest.raises(ValueError, match="mask generator 'philox'"):
        set_mask_generator(AdapterDropout(0.1, rngs=nnx.Rngs(0)), "philox")


@pytest.mark.parametrize("in_shape", [(12,), (3, 4)], ids=["vector-in", "heads-in"])
def test_low_rank_adapter_backward_recomputes_the_mask_and_equals_autodiff(in_shape):
    """A LoRA adapter under hash dropout keeps no mask for its backward (it recomputes the mask
    from the key's words); its output and gradients equal autodiff of the plain formula
    ``scale * dropout(x) A B`` with the same mask, and consecutive calls draw new masks."""
    from difflora_jax.modeling.adapters import AdapterParam, LowRank

    adapter = LowRank(
        in_shape, (5,), ("a",) * len(in_shape), ("b",), rank=3, scale=1.7, dropout=0.3,
        init="kaiming", b_init="kaiming", rngs=nnx.Rngs(params=0, dropout=1),
    )  # fmt: skip
    dropout = adapter.dropout
    assert isinstance(dropout, AdapterDropout) and isinstance(dropout.rngs, nnx.RngStream)
    dropout.deterministic = False
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, *in_shape)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 5)), jnp.float32)
    a, b = adapter.a[...], adapter.b[...]

    def plain(x, a, b, key):  # what autodiff sees: the mask applied, then the two matmuls
        dropped = jnp.where(hash_keep_mask(key, x.shape, 0.3), x / 0.7, 0.0)
        return 1.7 * jnp.einsum("...r,ro->...o", jnp.tensordot(dropped, a, len(in_shape)), b)

    for _ in range(2):  # each call advances the stream: the reference follows it
        stream = dropout.rngs
        key = jax.random.fold_in(stream.key[...], stream.count[...])  # what the call will draw
        graphdef, params, rng, rest = nnx.split(adapter, AdapterParam, nnx.RngState, ...)
        params, rng = nnx.to_pure_dict(params), nnx.to_pure_dict(rng)

        def ours(x, params, rng, graphdef=graphdef, rest=rest):
            return jnp.sum(nnx.merge(graphdef, params, rng, rest)(x) * weights)

        d_x, d_params = jax.grad(ours, argnums=(0, 1))(x, params, rng)
        got = (d_x, d_params["a"], d_params["b"])
        want = jax.grad(lambda x, a, b, k=key: jnp.sum(plain(x, a, b, k) * weights), (0, 1, 2))(
            x, a, b
        )
        for name, g, w in zip(("x", "A", "B"), got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(adapter(x), plain(x, a, b, key), rtol=1e-5, atol=1e-6)
