"""Causal block skipping on the XLA path equals the dense reference (values and gradients),
for MHA and GQA, with padding and packing, at block sizes that do and do not divide the length;
the other backends (jax.nn.dot_product_attention, the Pallas flash kernel run by the Pallas
interpreter on CPU) equal it too; and a model computes the same logits whichever is used."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difflora_jax.modeling.adapters import apply_adapters
from difflora_jax.modeling.attention import (
    AttentionMask,
    attention,
    differential_attention,
    make_attention_mask,
)
from difflora_jax.modeling.llama import LlamaForCausalLM
from tests.tiny import tiny_config
from tests.variants import difflora

LENGTH = 24


def _inputs(heads: int, kv_heads: int, *, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, LENGTH, heads, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, LENGTH, kv_heads, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, LENGTH, kv_heads, 8)), jnp.float32)
    # row 0: left padding (5 tokens); row 1: three packed segments and right padding (3 tokens)
    valid = np.ones((2, LENGTH), bool)
    valid[0, :5] = False
    valid[1, -3:] = False
    segments = np.zeros((2, LENGTH), np.int32)
    segments[0, 5:] = 1
    segments[1, :7], segments[1, 7:16], segments[1, 16:-3] = 1, 2, 3
    mask = make_attention_mask(
        jnp.asarray(valid), jnp.arange(LENGTH), jnp.asarray(segments), jnp.asarray(segments)
    )
    return q, k, v, AttentionMask(dense=mask, segments=jnp.asarray(segments)), valid


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("block", [8, 5])  # divides 24, does not
def test_blocked_equals_dense(heads, kv_heads, block):
    q, k, v, mask, valid = _inputs(heads, kv_heads)
    dense = attention(q, k, v, mask)
    blocked = attention(q, k, v, mask, causal_block=block)
    real = valid  # rows with at least one valid key; padding rows are don't-care
    np.testing.assert_allclose(
        np.asarray(blocked)[real], np.asarray(dense)[real], rtol=1e-5, atol=1e-6
    )

    def loss(q, k, v, block):
        out = attention(q, k, v, mask, causal_block=block)
        return jnp.sum(jnp.where(jnp.asarray(real)[:, :, None, None], out, 0.0) ** 2)

    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, None)
    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, block)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def _reference_attention(q, k, v, mask):
    """Textbook grouped-query softmax attention, differentiated by JAX's autodiff (no custom
    backward): each key head repeated over its query heads, masked logits, softmax, sum."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("block", [None, 8, 5])
def test_xla_path_and_its_recomputing_backward_equal_autodiff_of_the_textbook_formula(
    heads, kv_heads, block
):
    """The XLA path's custom backward (probabilities recomputed from each row's saved maximum
    and normaliser) gives autodiff's gradients of the plain formula. Without blocks at every
    row, rows without a valid key (left padding) included: their output is the mean of the
    values and their logits get no gradient. With blocks such a row averages only its block's
    key prefix, so there the rows without a valid key are left out (don't-care rows)."""
    q, k, v, mask, valid = _inputs(heads, kv_heads, seed=1)
    rows = np.ones_like(valid) if block is None else valid
    weights = np.random.default_rng(2).standard_normal((2, LENGTH, heads, 8))
    weights = jnp.asarray(weights * rows[:, :, None, None], jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * weights)

    ours = lambda q, k, v: attention(q, k, v, mask, causal_block=block)  # noqa: E731
    reference = lambda q, k, v: _reference_attention(q, k, v, mask.dense)  # noqa: E731
    np.testing.assert_allclose(
        np.asarray(ours(q, k, v))[rows], np.asarray(reference(q, k, v))[rows], rtol=1e-5, atol=1e-6
    )
    got = jax.grad(loss, argnums=(1, 2, 3))(ours, q, k, v)
    want = jax.grad(loss, argnums=(1, 2, 3))(reference, q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6, err_msg=name)
    # under jit and remat too (the training step's setting)
    remat = jax.jit(
        jax.grad(lambda q, k, v: loss(jax.checkpoint(ours), q, k, v), argnums=(0, 1, 2))
    )
    for name, g, w in zip("qkv", remat(q, k, v), want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize(
    "heads, kv_heads, block",
    [(4, 4, None), (4, 2, 8), (6, 1, 5)],  # MHA dense; GQA, MQA in blocks that divide 24, do not
    ids=["mha-dense", "gqa-8", "mqa-5"],
)
def test_fused_differential_path_equals_autodiff_of_the_two_maps_formula(heads, kv_heads, block):
    """``differential_attention`` on the XLA path has its own kernel and backward (both maps
    weigh the shared V in place; the backward's row terms and the lambda gradient come from the
    saved outputs); it gives the values and the q, k, v and lambda gradients
    of ``softmax(Q1 K1^T) V - lam softmax(Q2 K2^T) V`` written out and differentiated by
    autodiff, with padding and packing, at block sizes that do and do not divide the length.
    Rows without a valid key are compared without blocks only (as for ``attention``)."""
    q1, k1, v, mask, valid = _inputs(heads, kv_heads, seed=3)
    q2, k2, _, _, _ = _inputs(heads, kv_heads, seed=4)
    queries, keys = jnp.concatenate([q1, q2], axis=2), jnp.concatenate([k1, k2], axis=2)
    rows = np.ones_like(valid) if block is None else valid
    weights = np.random.default_rng(5).standard_normal((2, LENGTH, heads, 8))
    weights = jnp.asarray(weights * rows[:, :, None, None], jnp.float32)

    def ours(queries, keys, v, lam):
        return differential_attention(queries, keys, v, lam, mask, causal_block=block)

    def reference(queries, keys, v, lam):
        positive = _reference_attention(queries[:, :, :heads], keys[:, :, :kv_heads], v, mask.dense)
        negative = _reference_attention(queries[:, :, heads:], keys[:, :, kv_heads:], v, mask.dense)
        return positive - lam * negative

    def loss(fn, *args):
        return jnp.sum(fn(*args) * weights)

    args = (queries, keys, v, jnp.float32(0.3))
    np.testing.assert_allclose(
        np.asarray(ours(*args))[rows], np.asarray(reference(*args))[rows], rtol=1e-5, atol=1e-6
    )
    want = jax.grad(loss, argnums=(1, 2, 3, 4))(reference, *args)
    got = jax.grad(loss, argnums=(1, 2, 3, 4))(ours, *args)
    remat = jax.jit(jax.grad(lambda *a: loss(jax.checkpoint(ours), *a), argnums=(0, 1, 2, 3)))
    for grads in (got, remat(*args)):
        for name, g, w in zip(["queries", "keys", "v", "lambda"], grads, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6, err_msg=name)


def test_differential_attention_takes_one_v_per_map_and_the_other_backends():
    """With ``[V1; V2]`` stacked (a V per map) or another backend it is one ``attention`` call
    over the stacked heads, combined after; a shared V stacked twice gives the fused result."""
    q1, k1, v, mask, valid = _inputs(4, 2, seed=6)
    q2, k2, _, _, _ = _inputs(4, 2, seed=7)
    queries, keys = jnp.concatenate([q1, q2], axis=2), jnp.concatenate([k1, k2], axis=2)
    lam = jnp.float32(0.7)
    fused = differential_attention(queries, keys, v, lam, mask, causal_block=8)
    for values, backend in [(jnp.concatenate([v, v], axis=2), "xla"), (v, "jax")]:
        other = differential_attention(queries, keys, values, lam, mask, backend=backend)
        np.testing.assert_allclose(
            np.asarray(other)[valid], np.asarray(fused)[valid], rtol=1e-5, atol=1e-6
        )


def test_blocks_are_only_used_where_the_caller_says_the_mask_is_causal():
    q, k, v, mask, _ = _inputs(4, 2)
    full = jnp.ones_like(mask.dense)  # a non-causal mask: every query sees every key
    dense = attention(q, k, v, full)
    # without causal_block the full mask is honoured, keys after the query included
    assert not np.allclose(np.asarray(dense), np.asarray(attention(q, k, v, mask)))
    # a cached decode step (q_len != kv_len) never blocks, whatever it is asked
    one = attention(q[:, -1:], k, v, full[:, :, -1:], causal_block=4)
    np.testing.assert_allclose(np.asarray(one), np.asarray(dense[:, -1:]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "adapter", [None, difflora(negative_term="adapters")], ids=["llama", "difflora"]
)
def test_model_logits_with_and_without_blocks(adapter):
    model = LlamaForCausalLM(tiny_config(max_position_embeddings=64), rngs=nnx.Rngs(0))
    if adapter is not None:
        apply_adapters(model, adapter)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 40)), jnp.int32)
    pad = jnp.asarray(np.r_[np.zeros(6), np.ones(34)][None].repeat(2, 0).astype(np.int32))
    model.set_attention_backend("xla", causal_block=None)
    dense = np.asarray(model(ids, pad))
    model.set_attention_backend("xla", causal_block=16)
    blocked = np.asarray(model(ids, pad))
    real = np.asarray(pad, bool)
    np.testing.assert_allclose(blocked[real], dense[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("backend", ["jax", "pallas"])
def test_backend_equals_the_xla_reference(backend, heads, kv_heads):
    q, k, v, mask, valid = _inputs(heads, kv_heads, seed=1)
    real = jnp.asarray(valid)[:, :, None, None]

    def loss(q, k, v, backend):
        out = attention(q, k, v, mask, backend=backend)
        return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

    (_, want), want_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, "xla")
    (_, got), got_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, backend)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "adapter", [None, difflora(negative_term="adapters")], ids=["llama", "difflora"]
)
def test_model_logits_and_cached_decoding_with_the_pallas_backend(adapter):
    model = LlamaForCausalLM(tiny_config(max_position_embeddings=64), rngs=nnx.Rngs(0))
    if adapter is not None:
        apply_adapters(model, adapter)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 128, (2, 20)), jnp.int32)
    pad = jnp.asarray(np.r_[np.zeros(3), np.ones(17)][None].repeat(2, 0).astype(np.int32))
    want = np.asarray(model(ids, pad))
    model.set_attention_backend("pallas")
    got = np.asarray(model(ids, pad))
    real = np.asarray(pad, bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    # with a cache the Pallas backend decodes through the xla path: same logits step by step
    cache = model.init_cache(2, 24)
    positions = jnp.maximum(jnp.cumsum(pad, axis=-1) - 1, 0)
    logits, cache = model.forward(ids, pad, positions=positions, cache=cache)
    np.testing.assert_allclose(np.asarray(logits)[real], want[real], rtol=1e-5, atol=1e-5)
