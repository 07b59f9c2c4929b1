"""Adapter-only training: schedule and optimizer, the jitted train step, Orbax checkpoints,
the training loop.

```python
from difflora_jax.config import load_train_config
from difflora_jax.training import load_adapter, train

result = train(load_train_config("run.yaml", ["max_steps=100"]))   # or resume=True
model = load_adapter(base_model, result.run_dir)                    # adapters onto a base model
```
"""

from difflora_jax.training.batches import RandomBatches, build_batches
from difflora_jax.training.checkpoint import (
    Checkpointer,
    base_model_record,
    check_base_model,
    load_adapter,
    locate_checkpoint,
    model_fingerprint,
    read_checkpoint_meta,
)
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
from difflora_jax.training.step import (
    batch_loss,
    compute_gradients,
    lambda_layers,
    lambda_values,
    split_for_training,
    train_step,
    write_back,
)

__all__ = [
    "Checkpointer",
    "MetricsLogger",
    "NonFiniteLossError",
    "RandomBatches",
    "TrainResult",
    "TrainState",
    "TrainingError",
    "base_model_record",
    "batch_loss",
    "build_batches",
    "check_base_model",
    "compute_gradients",
    "lambda_layers",
    "lambda_values",
    "learning_rate",
    "linear_warmup_decay",
    "load_adapter",
    "locate_checkpoint",
    "make_optimizer",
    "model_fingerprint",
    "read_checkpoint_meta",
    "read_metrics",
    "reseed_dropout",
    "split_for_training",
    "train",
    "train_step",
    "write_back",
]
