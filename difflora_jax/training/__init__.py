"""Adapter-only training: its configs, schedule and optimizer, the jitted train step, the
training loop. Adapter checkpoints live one layer down (``difflora_jax.adapter_checkpoint``),
so inference and export never need this package.

```python
from difflora_jax.training import load_train_config, train

result = train(load_train_config("run.yaml", ["max_steps=100"]))   # or resume=True
```
"""

from difflora_jax.training.batches import RandomBatches, build_batches
from difflora_jax.training.config import (
    DataConfig,
    OptimizerConfig,
    TrainConfig,
    load_train_config,
    parse_override,
)
from difflora_jax.training.layout import stack_layers, to_per_layer, to_stacked, unstack_layers
from difflora_jax.training.loop import (
    NonFiniteLossError,
    TrainingError,
    TrainResult,
    TrainState,
    reseed_dropout,
    train,
)
from difflora_jax.training.metrics import MetricsLogger, read_metrics
from difflora_jax.training.optimizer import learning_rate, make_optimizer
from difflora_jax.training.schedule import linear_warmup_decay
from difflora_jax.training.step import compute_gradients, split_for_training, train_step

__all__ = [
    "DataConfig",
    "MetricsLogger",
    "NonFiniteLossError",
    "OptimizerConfig",
    "RandomBatches",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingError",
    "build_batches",
    "compute_gradients",
    "learning_rate",
    "linear_warmup_decay",
    "load_train_config",
    "make_optimizer",
    "parse_override",
    "read_metrics",
    "reseed_dropout",
    "split_for_training",
    "stack_layers",
    "to_per_layer",
    "to_stacked",
    "train",
    "train_step",
    "unstack_layers",
]
