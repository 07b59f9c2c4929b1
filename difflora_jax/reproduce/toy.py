"""A toy setting where DiffLoRA ablations run in seconds (the notebooks use it).

A tiny Llama is *pretrained here*, all of its weights, on key-value retrieval: a sequence of
``key value`` pairs, then a query key, and the model must emit that key's value. The
adaptation task is the same retrieval with noise: more pairs and random noise tokens scattered
between them, the "context noise" differential attention is meant to cancel. Each variant then
adapts the pretrained model with the real training loop (``training.train``, adapters only).

Vocabulary (64 ids): 0 pad, 1 BOS, 2 the query marker, ``KEYS`` and ``VALUES`` (24 each), and
``NOISE`` (13 ids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.losses import batch_loss
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.training import TrainResult, train
from difflora_jax.training.config import DataConfig, TrainConfig

PAD, BOS, QUERY = 0, 1, 2
KEYS = np.arange(3, 27)
VALUES = np.arange(27, 51)
NOISE = np.arange(51, 64)
CONFIG = ModelConfig(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=10000.0,
    name="toy-retrieval",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Task:
    """``pairs`` key-value pairs with ``noise`` noise tokens scattered among them."""

    pairs: int = 4
    noise: int = 0
    length: int = 64


PRETRAIN = Task(pairs=4, noise=0)
NOISY = Task(pairs=6, noise=24)


def make_batch(task: Task, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch in the training loop's format; the loss falls on the answer token only."""
    ids = np.full((batch, task.length + 1), PAD, np.int32)
    loss_mask = np.zeros((batch, task.length), np.int32)
    segment = np.zeros((batch, task.length), np.int32)
    for row in range(batch):
        keys = rng.choice(KEYS, task.pairs, replace=False)
        values = rng.choice(VALUES, task.pairs)
        units = [[int(k), int(v)] for k, v in zip(keys, values)]
        units += [[int(n)] for n in rng.choice(NOISE, task.noise)]
        order = rng.permutation(len(units))
        q = int(rng.integers(task.pairs))
        seq = [BOS, *[t for i in order for t in units[i]], QUERY, int(keys[q]), int(values[q])]
        if len(seq) > task.length + 1:
            raise ValueError(f"{task} does not fit {task.length} tokens")
        ids[row, : len(seq)] = seq
        loss_mask[row, len(seq) - 2] = 1  # the query key predicts its value
        segment[row, : len(seq) - 1] = 1
    positions = np.broadcast_to(np.arange(task.length, dtype=np.int32), (batch, task.length))
    return {
        "input_ids": ids[:, :-1].copy(),
        "targets": ids[:, 1:].copy(),
        "loss_mask": loss_mask,
        "segment_ids": segment,
        "positions": np.where(segment > 0, positions, 0).astype(np.int32),
    }


def batches(task: Task, batch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    while True:
        yield make_batch(task, batch, rng)


def pretrain(
    steps: int = 600, batch: int = 64, seed: int = 0, lr: float = 3e-3
) -> LlamaForCausalLM:
    """The toy base model: every weight trained with AdamW on ``PRETRAIN`` retrieval."""
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            loss, _ = batch_loss(model, batch)
            return loss

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    data = batches(PRETRAIN, batch, seed + 1000)
    for _ in range(steps):
        step(model, optimizer, {k: jnp.asarray(v) for k, v in next(data).items()})
    return model


def evaluate(model: LlamaForCausalLM, task: Task, n: int = 512, seed: int = 12345) -> dict:
    """Answer accuracy (argmax at the query) and mean answer loss on ``n`` held-out items."""
    batch = make_batch(task, n, np.random.default_rng(seed))
    logits = np.asarray(
        _logits(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["segment_ids"]))
    )
    rows, cols = np.nonzero(batch["loss_mask"])
    answer = batch["targets"][rows, cols]
    picked = logits[rows, cols]
    logp = picked - np.log(np.exp(picked - picked.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= picked.max(-1, keepdims=True)
    return {
        "accuracy": float((picked.argmax(-1) == answer).mean()),
        "loss": float(-logp[np.arange(len(answer)), answer].mean()),
    }


@nnx.jit
def _logits(model: LlamaForCausalLM, ids: jax.Array, segments: jax.Array) -> jax.Array:
    return model(ids, (segments > 0).astype(jnp.int32)).astype(jnp.float32)


def adapt(
    base: LlamaForCausalLM,
    method: AdapterConfig | str,
    out: str | Path,
    *,
    task: Task = NOISY,
    steps: int = 150,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> TrainResult:
    """``method``'s adapters trained on ``task`` from a copy of ``base`` with the real loop
    (AdamW over adapters only, warmup 10%, the same batches for every method)."""
    config = TrainConfig(
        model=CONFIG.name,
        method=dataclasses.asdict(method) if isinstance(method, AdapterConfig) else method,
        output_dir=str(out),
        dtype="float32",
        data=DataConfig(source="random", max_length=task.length),
        batch_size=batch,
        max_steps=steps,
        learning_rate=lr,
        warmup_ratio=0.1,
        save_every=steps,
        keep_checkpoints=1,
        seed=seed,
    )
    return train(config, model=nnx.clone(base), batches=batches(task, batch, seed), progress=False)


def curve(result: TrainResult) -> tuple[list[int], list[float]]:
    """(steps, training losses) of a run."""
    return [m["step"] for m in result.metrics], [m["loss"] for m in result.metrics]


def summary(name: str, result: TrainResult, base_score: dict[str, Any]) -> dict[str, Any]:
    """One table row: the adapted model's held-out scores on the noisy task."""
    scores = evaluate(result.model, NOISY)
    _, losses = curve(result)
    return {
        "variant": name,
        "first loss": losses[0],
        **scores,
        "base accuracy": base_score["accuracy"],
    }
