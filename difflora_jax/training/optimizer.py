"""AdamW over the adapter parameters: linear warmup + decay, clipping by global norm.

The optimizer sees only the trainable set (a pure dict of the model's ``AdapterParam`` arrays,
all float32), so its state is float32 and holds adapter entries only, whatever the dtype of the
frozen base weights.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from difflora_jax.training.config import OptimizerConfig
from difflora_jax.training.layout import in_stacked_run
from difflora_jax.training.schedule import linear_warmup_decay


def decay_mask(params: Any) -> Any:
    """Weight decay on adapter matrices only (ndim >= 2), not lambda vectors or norm scales;
    in either layout (``training.layout``: a stacked run's arrays carry one more axis)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim - in_stacked_run(path) >= 2, params
    )


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(max_grad_norm)`` (if > 0), then AdamW on the linear schedule."""
    config.validate()
    schedule = linear_warmup_decay(config.learning_rate, config.warmup_steps, config.total_steps)
    adamw = optax.adamw(
        schedule,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    if config.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
    return optax.chain(optax.identity(), adamw)


def learning_rate(config: OptimizerConfig, step: int) -> float:
    """The rate update ``step`` (1-based, as logged) used."""
    schedule = linear_warmup_decay(config.learning_rate, config.warmup_steps, config.total_steps)
    return float(schedule(step - 1))
