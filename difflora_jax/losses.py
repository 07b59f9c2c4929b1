"""The batch contract and the token loss, shared by training, evaluation and the data pipeline.

A batch is a dict of int32 ``[batch, length]`` arrays under ``BATCH_KEYS``:

    input_ids    token ids (padding: any id, usually the pad id)
    targets      the next token of each position (0 where there is none)
    loss_mask    1 where the position's target counts in the loss (assistant tokens)
    segment_ids  1, 2, ... per packed sequence in a row; 0 for padding
    positions    RoPE position inside its segment

Loss: ``sum(loss_mask * cross_entropy(logits, targets)) / sum(loss_mask)`` in float32.

The training and evaluation losses never hold the float32 logits of the whole batch: they go
from the final hidden states through the LM head in chunks of tokens
(:func:`chunked_token_loss_sum`), and the gradient with respect to the hidden states is formed
chunk by chunk in the forward pass (softmax minus one-hot, times the head), so the backward pass
neither stores nor recomputes logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from difflora_jax.modeling.llama import LlamaForCausalLM

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def token_loss_sum(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(sum(loss_mask * cross_entropy), sum(loss_mask))``, float32 scalars."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask)


# Tokens per chunk of the chunked LM head + cross-entropy. SmolLM2-135M (vocabulary 49152) at
# 4 x 512 tokens on a 2-core CPU, loss and hidden-state gradient: full logits 1.74 s, chunks of
# 256/512/1024 tokens 1.62 s; the chunk's logits are chunk x vocab x 4 bytes (200 MB at 1024).
LOSS_CHUNK = 1024


def chunked_token_loss_sum(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    *,
    vocab_axis: int = 0,
    chunk: int = LOSS_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """``token_loss_sum(hidden @ head, targets, loss_mask)`` without the full logits.

    ``hidden`` ``[..., embed]``; ``head`` ``[vocab, embed]`` (``vocab_axis=0``, a tied embedding)
    or ``[embed, vocab]`` (``vocab_axis=1``). Logits are accumulated in float32. Differentiable
    in ``hidden`` and ``head`` (the head's gradient is recomputed in the backward pass and
    dropped by XLA when the head is frozen, as it is in adapter training).
    """
    embed = hidden.shape[-1]
    flat = hidden.reshape(-1, embed)
    tokens = flat.shape[0]
    chunk = max(1, min(chunk, tokens))
    pad = -tokens % chunk
    mask = loss_mask.reshape(-1).astype(jnp.float32)
    labels = targets.reshape(-1).astype(jnp.int32)
    if pad:
        flat = jnp.pad(flat, ((0, pad), (0, 0)))
        mask, labels = jnp.pad(mask, (0, pad)), jnp.pad(labels, (0, pad))
    loss = _chunked_loss(flat, head, labels, mask, vocab_axis, chunk)
    return jnp.asarray(loss), jnp.sum(mask)


def _chunk_logits(h: jax.Array, head: jax.Array, vocab_axis: int) -> jax.Array:
    contract = 1 - vocab_axis  # the head's embed axis
    return jax.lax.dot_general(
        h.astype(head.dtype),
        head,
        (((1,), (contract,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def _loss_and_hidden_grad(flat, head, labels, mask, vocab_axis, chunk, with_grad):
    def body(_, xs):
        h, t, m = xs
        logits = _chunk_logits(h, head, vocab_axis)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        loss = jnp.sum((lse - picked) * m)
        if not with_grad:
            return None, (loss, None)
        # d loss / d logits = (softmax - one_hot) * mask, then back through the head
        dlogits = (jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(t, logits.shape[-1])) * m[
            :, None
        ]
        dh = jax.lax.dot_general(
            dlogits.astype(head.dtype),
            head,
            (((1,), (vocab_axis,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return None, (loss, dh.astype(flat.dtype))

    xs = (_chunks(flat, chunk), _chunks(labels, chunk), _chunks(mask, chunk))
    _, (losses, dh) = jax.lax.scan(body, None, xs)
    return jnp.sum(losses), None if dh is None else dh.reshape(flat.shape)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_loss(flat, head, labels, mask, vocab_axis, chunk):
    return _loss_and_hidden_grad(flat, head, labels, mask, vocab_axis, chunk, False)[0]


def _chunked_loss_fwd(flat, head, labels, mask, vocab_axis, chunk):
    loss, dh = _loss_and_hidden_grad(flat, head, labels, mask, vocab_axis, chunk, True)
    return loss, (dh, flat, head, labels, mask)


def _chunked_loss_bwd(vocab_axis, chunk, residuals, cotangent):
    dh, flat, head, labels, mask = residuals

    def head_grad(total, xs):
        h, t, m = xs
        logits = _chunk_logits(h, head, vocab_axis)
        dlogits = (jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(t, logits.shape[-1])) * m[
            :, None
        ]
        spec = "cv,ce->ve" if vocab_axis == 0 else "cv,ce->ev"
        return total + jnp.einsum(spec, dlogits, h.astype(jnp.float32)), None

    xs = (_chunks(flat, chunk), _chunks(labels, chunk), _chunks(mask, chunk))
    dhead, _ = jax.lax.scan(head_grad, jnp.zeros(head.shape, jnp.float32), xs)
    return (
        (dh * cotangent).astype(flat.dtype),
        (dhead * cotangent).astype(head.dtype),
        None,
        None,
    )


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def batch_logits(model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Logits ``[batch, length, vocab]`` of a packed batch (segments attend within themselves)."""
    segment_ids = batch["segment_ids"]
    return model(
        batch["input_ids"],
        segment_ids > 0,
        positions=batch["positions"],
        segment_ids=segment_ids,
    )


def batch_loss_sum(model: LlamaForCausalLM, batch: Mapping[str, jax.Array]) -> jax.Array:
    """``sum(loss_mask * cross_entropy)`` of ``model`` on ``batch`` (what gradients add up),
    through the chunked LM head (:func:`chunked_token_loss_sum`)."""
    segment_ids = batch["segment_ids"]
    hidden = model.hidden_states(
        batch["input_ids"],
        segment_ids > 0,
        positions=batch["positions"],
        segment_ids=segment_ids,
    )
    head, vocab_axis = model.head_matrix()
    loss_sum, _ = chunked_token_loss_sum(
        hidden, head, batch["targets"], batch["loss_mask"], vocab_axis=vocab_axis
    )
    return loss_sum


def batch_loss(model: LlamaForCausalLM, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """``(mean loss over loss tokens, loss tokens)`` of ``model`` as it is (no dropout unless the
    caller passes a training view); the reference the train step is tested against."""
    batch = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
    loss_sum = batch_loss_sum(model, batch)
    tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    return loss_sum / jnp.maximum(tokens, 1.0), tokens
