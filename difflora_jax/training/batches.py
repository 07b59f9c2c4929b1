"""Training batches from a DataConfig: the data pipeline's SFT iterator, or random tokens.

Every iterator yields dicts of int32 ``[batch, max_length]`` arrays (``input_ids``, ``targets``,
``loss_mask``, ``segment_ids``, ``positions``; see ``difflora_jax.data.packing``) and has
``state()`` (a JSON-able dict) and ``restore(state)``, which checkpoints save and resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from difflora_jax import data
from difflora_jax.data.streams import StreamedBatches
from difflora_jax.errors import ConfigError
from difflora_jax.parallel import gather_max
from difflora_jax.protocols import Tokenizer
from difflora_jax.training.config import DataConfig


class RandomBatches:
    """Uniform random tokens, two packed segments per row, loss on each segment's second half.

    Batch ``k`` depends only on ``(seed, k)``, so the state is the batch count. For smoke tests
    and throughput runs: needs no tokenizer.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        batch_size: int,
        max_length: int,
        seed: int = 0,
        state: Mapping[str, Any] | None = None,
    ):
        if max_length < 4:
            raise ConfigError(
                f"max_length={max_length} is invalid for random batches: must be >= 4"
            )
        self.vocab_size, self.batch_size, self.max_length = vocab_size, batch_size, max_length
        self.seed = int(seed)
        self.batches = 0
        if state is not None:
            self.restore(state)

    def __iter__(self) -> RandomBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.batches])
        self.batches += 1
        b, t = self.batch_size, self.max_length
        ids = rng.integers(0, self.vocab_size, (b, t + 1), dtype=np.int32)
        split = rng.integers(2, t - 1, b)  # first segment [0, split), second [split, t)
        columns = np.arange(t)[None, :]
        first = columns < split[:, None]
        segment_ids = np.where(first, 1, 2).astype(np.int32)
        start = np.where(first, 0, split[:, None])
        end = np.where(first, split[:, None], t)
        positions = (columns - start).astype(np.int32)
        targets = ids[:, 1:].copy()
        last = columns == end - 1  # no loss across a segment boundary or past the row
        mid = start + (end - start) // 2
        loss_mask = ((columns >= mid) & ~last).astype(np.int32)
        targets[last] = 0
        return {
            "input_ids": ids[:, :t],
            "targets": targets,
            "loss_mask": loss_mask,
            "segment_ids": segment_ids,
            "positions": positions,
        }

    def state(self) -> dict[str, Any]:
        return {
            "source": "random",
            "batches": self.batches,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        for key in ("seed", "batch_size", "max_length"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"random-batch state was saved with {key}={state.get(key)!r}, but this run "
                    f"has {key}={getattr(self, key)!r}"
                )
        self.batches = int(state["batches"])


def load_examples(config: DataConfig):
    """The chat examples ``config`` names (a list or a random-access source)."""
    if config.source == "synthetic":
        return data.make_mix(
            config.num_examples, seed=config.seed, split=config.split, tasks=config.tasks
        )
    if config.source not in ("jsonl", "hf", "tfds"):
        raise ConfigError(f"data.source={config.source!r} has no examples")
    if not config.path:
        raise ConfigError(f"data.source={config.source!r} needs data.path")
    if config.source == "jsonl":
        return data.load_jsonl(config.path)
    if config.source == "hf":
        return data.load_hf_dataset(config.path, split=config.split)
    return data.load_tfds(config.path, split=config.split, data_dir=config.data_dir)


def build_batches(
    config: DataConfig,
    tokenizer: Tokenizer | None,
    *,
    batch_size: int,
    vocab_size: int,
    rows: slice | None = None,
):
    """The resumable batch iterator of ``config`` (rows of ``config.max_length`` tokens). With
    ``config.streams`` > 1 (chat sources) it yields only ``rows`` of each global batch (this
    process's, default all), reading only their streams (``data.streams``)."""
    config.validate()
    if config.source == "random":
        return RandomBatches(
            vocab_size, batch_size=batch_size, max_length=config.max_length, seed=config.seed
        )
    if tokenizer is None:
        raise ConfigError(
            f"data.source={config.source!r} needs a tokenizer with a chat template, and the "
            "model has none (use a checkpoint with tokenizer files, or data.source=random)"
        )
    if config.streams > 1:
        return StreamedBatches(
            load_examples(config),
            tokenizer,
            batch_size=batch_size,
            max_length=config.max_length,
            streams=config.streams,
            rows=rows or slice(0, batch_size),
            seed=config.seed,
            packing=config.packing,
            shuffle=config.shuffle,
            gather=gather_max,
        )
    return data.SFTBatchIterator(
        load_examples(config),
        tokenizer,
        batch_size=batch_size,
        max_length=config.max_length,
        seed=config.seed,
        packing=config.packing,
        shuffle=config.shuffle,
    )
