"""The chunked LM head + cross-entropy equals the loss over full logits (value and gradients),
checked against a float64 NumPy cross-entropy and against JAX autodiff through full logits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from difflora_jax.losses import batch_loss, chunked_token_loss_sum, token_loss_sum
from tests.tiny import BYTE_TINY, random_batch, tiny_model


def _case(seed: int, shape=(3, 7), embed=16, vocab=50):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(*shape, embed)).astype(np.float32)
    table = (rng.normal(size=(vocab, embed)) * 0.3).astype(np.float32)
    targets = rng.integers(0, vocab, size=shape).astype(np.int32)
    mask = (rng.random(shape) < 0.7).astype(np.int32)
    return hidden, table, targets, mask


def _numpy_loss(hidden, table, targets, mask) -> float:
    logits = hidden.astype(np.float64) @ table.astype(np.float64).T
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    return float((nll * mask).sum())


@pytest.mark.parametrize("chunk", [1, 4, 5, 21, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("vocab_axis", [0, 1], ids=["tied", "untied"])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(chunk, vocab_axis):
    hidden, table, targets, mask = _case(seed=chunk)
    head = table if vocab_axis == 0 else table.T.copy()

    def chunked(h, w):
        return chunked_token_loss_sum(h, w, targets, mask, vocab_axis=vocab_axis, chunk=chunk)[0]

    def full(h, w):
        logits = h @ (w.T if vocab_axis == 0 else w)
        return token_loss_sum(logits, targets, mask)[0]

    loss, (dh, dw) = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, head)
    ref_loss, (ref_dh, ref_dw) = jax.value_and_grad(full, argnums=(0, 1))(hidden, head)
    np.testing.assert_allclose(float(loss), _numpy_loss(hidden, table, targets, mask), rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(dh, ref_dh, atol=1e-6)
    np.testing.assert_allclose(dw, ref_dw, atol=1e-6)
    tokens = chunked_token_loss_sum(hidden, head, targets, mask, vocab_axis=vocab_axis)[1]
    assert float(tokens) == mask.sum()


def test_chunked_loss_cotangent_scales_its_gradient():
    hidden, table, targets, mask = _case(seed=9)

    def scaled(h):
        return 2.5 * chunked_token_loss_sum(h, table, targets, mask, chunk=4)[0]

    def full(h):
        return 2.5 * token_loss_sum(h @ table.T, targets, mask)[0]

    np.testing.assert_allclose(jax.grad(scaled)(hidden), jax.grad(full)(hidden), atol=1e-6)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_model_loss_equals_the_loss_of_its_logits(tie):
    model = tiny_model(config=dataclasses.replace(BYTE_TINY, tie_word_embeddings=tie))
    batch = random_batch(2, 24, seed=4)
    loss, tokens = jax.jit(lambda b: batch_loss(model, b))(batch)
    logits = model(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["segment_ids"]) > 0,
        positions=jnp.asarray(batch["positions"]),
        segment_ids=jnp.asarray(batch["segment_ids"]),
    )
    ref_sum, ref_tokens = token_loss_sum(logits, batch["targets"], batch["loss_mask"])
    assert float(tokens) == float(ref_tokens) > 0
    np.testing.assert_allclose(float(loss), float(ref_sum / ref_tokens), rtol=1e-6)
