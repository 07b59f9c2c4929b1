"""The batch contract and the token loss, shared by training, evaluation and the data pipeline.

A batch is a dict of int32 ``[batch, length]`` arrays under ``BATCH_KEYS``:

    input_ids    token ids (padding: any id, usually the pad id)
    targets      the next token of each position (0 where there is none)
    loss_mask    1 where the position's target counts in the loss (assistant tokens)
    segment_ids  1, 2, ... per packed sequence in a row; 0 for padding
    positions    RoPE position inside its segment

Loss: ``sum(loss_mask * cross_entropy(logits, targets)) / sum(loss_mask)`` in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def token_loss_sum(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(sum(loss_mask * cross_entropy), sum(loss_mask))``, float32 scalars."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask)


def batch_logits(model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Logits ``[batch, length, vocab]`` of a packed batch (segments attend within themselves)."""
    segment_ids = batch["segment_ids"]
    return model(
        batch["input_ids"],
        segment_ids > 0,
        positions=batch["positions"],
        segment_ids=segment_ids,
    )


def batch_loss_sum(model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
    """``sum(loss_mask * cross_entropy)`` of ``model`` on ``batch`` (what gradients add up)."""
    loss_sum, _ = token_loss_sum(batch_logits(model, batch), batch["targets"], batch["loss_mask"])
    return loss_sum


def batch_loss(model: nnx.Module, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """``(mean loss over loss tokens, loss tokens)`` of ``model`` as it is (no dropout unless the
    caller passes a training view); the reference the train step is tested against."""
    batch = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
    loss_sum, tokens = token_loss_sum(
        batch_logits(model, batch), batch["targets"], batch["loss_mask"]
    )
    return loss_sum / jnp.maximum(tokens, 1.0), tokens
