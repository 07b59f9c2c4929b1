"""Learning-rate schedules."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def linear_warmup_decay(
    peak_lr: float, warmup_steps: int, total_steps: int
) -> Callable[[ArrayLike], jax.Array]:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps`` updates, then linear decay to 0
    at ``total_steps``: transformers' ``get_linear_schedule_with_warmup`` (open-instruct's).

    The schedule maps the 0-based update count ``k`` to the rate that update uses, so with
    warmup the first update has rate 0, as in the reference trainer.
    """
    warmup = float(warmup_steps)
    decay = float(max(total_steps - warmup_steps, 1))
    total = float(total_steps)

    def schedule(count: ArrayLike) -> jax.Array:
        k = jnp.asarray(count, jnp.float32)
        rising = peak_lr * k / max(warmup, 1.0)
        falling = peak_lr * jnp.maximum(0.0, (total - k) / decay)
        return jnp.where(k < warmup, rising, falling).astype(jnp.float32)

    return schedule
