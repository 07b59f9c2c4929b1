"""A deterministic, resumable iterator of packed SFT batches.

The example stream is the concatenation of epochs; epoch ``e`` visits the source in the order
``permutation(seed, e)`` (or in order with ``shuffle=False``). Batches are filled from the stream
by ``BatchPacker`` and may straddle an epoch boundary. The iterator's whole state is the stream
position of the next example not yet in a batch, ``(epoch, position)``: nothing is buffered
between batches, so ``state()`` is a small JSON dict and ``restore`` continues bit for bit.

Examples are tokenized lazily, in batched chunks in stream order, and cached. Examples with no
loss token within ``max_length`` (e.g. the assistant turn truncated away) are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from difflora_jax.data.chat import ChatEncoder, TokenizedExample
from difflora_jax.data.packing import BatchPacker
from difflora_jax.errors import ConfigError, DataError
from difflora_jax.protocols import Tokenizer

STATE_VERSION = 1
_TOKENIZE_CHUNK = 256


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order ``[num_examples]`` in which epoch ``epoch`` visits the source."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class SFTBatchIterator:
    """Yields batches (see ``difflora_jax.data.packing``) forever over epochs.

    ``examples`` is a sequence of chat example dicts (a list, or a source from
    ``difflora_jax.data.sources``). ``pad_id`` defaults to the tokenizer's pad token, else its EOS
    token, else 0. ``state`` (from ``state()``) resumes a previous iterator.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        max_length: int,
        seed: int = 0,
        packing: bool = True,
        shuffle: bool = True,
        pad_id: int | None = None,
        state: Mapping[str, Any] | None = None,
        offset: int = 0,
        stride: int = 1,
    ):
        if len(examples) == 0:
            raise DataError("the example source is empty")
        if stride < 1 or not 0 <= offset < min(stride, len(examples)):
            raise ConfigError(
                f"offset={offset}, stride={stride} are invalid for {len(examples)} examples: "
                "need 0 <= offset < stride and offset < the number of examples"
            )
        # A stream of the source: positions offset, offset + stride, ... of each epoch's order.
        self.offset, self.stride = int(offset), int(stride)
        self.examples = examples
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = int(seed)
        self.packing = bool(packing)
        self.shuffle = bool(shuffle)
        if pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
            if pad_id is None:
                pad_id = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self._encoder = ChatEncoder(tokenizer, max_length=max_length)
        self._packer = BatchPacker(batch_size, max_length, packing=packing, pad_id=self.pad_id)
        self._cache: list[TokenizedExample | None] = [None] * len(examples)
        self._orders: dict[int, np.ndarray] = {}
        self.epoch = 0
        self.position = self.offset
        self.batches = 0
        if state is not None:
            self.restore(state)

    def __len__(self) -> int:
        """Examples per epoch."""
        return len(self.examples)

    def __iter__(self) -> SFTBatchIterator:
        return self

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.examples)
            order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return self._orders[epoch]

    def _example(self, epoch: int, position: int) -> TokenizedExample:
        index = int(self._order(epoch)[position])
        if self._cache[index] is None:
            # Tokenize the next chunk of uncached examples of this epoch in one call.
            span = 4 * _TOKENIZE_CHUNK * self.stride  # this stream's next examples only
            order = self._order(epoch)[position : position + span : self.stride]
            todo = [int(i) for i in order if self._cache[int(i)] is None][:_TOKENIZE_CHUNK]
            self.tokenize(todo)
        example = self._cache[index]
        assert example is not None  # the chunk just tokenized starts at this example
        return example

    def tokenize(self, indices: Sequence[int] | None = None) -> None:
        """Tokenize (and cache) source examples ``indices`` (default: all) in one batch."""
        indices = range(len(self.examples)) if indices is None else indices
        indices = [int(i) for i in indices if self._cache[int(i)] is None]
        for start in range(0, len(indices), 4 * _TOKENIZE_CHUNK):
            chunk = indices[start : start + 4 * _TOKENIZE_CHUNK]
            encoded = self._encoder.encode_batch(
                [self.examples[i] for i in chunk], wheres=[f"example {i}" for i in chunk]
            )
            for i, example in zip(chunk, encoded):
                self._cache[i] = example

    def __next__(self) -> dict[str, np.ndarray]:
        skipped = 0
        while True:
            example = self._example(self.epoch, self.position)
            if example.num_targets(self.max_length) == 0:
                skipped += 1
                if skipped > len(self.examples):
                    raise DataError(
                        f"no example has an assistant token within max_length={self.max_length}"
                    )
            elif not self._packer.add(example):
                break
            else:
                skipped = 0
            self.position += self.stride
            if self.position >= len(self.examples):
                self.epoch, self.position = self.epoch + 1, self.offset
            if not self.packing and self._packer.num_examples == self.batch_size:
                break
        self.batches += 1
        return self._packer.finish()

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable dict of where the stream stands (and the settings it needs)."""
        stream = {"offset": self.offset, "stride": self.stride} if self.stride > 1 else {}
        return {
            **stream,
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "batches": self.batches,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "packing": self.packing,
            "shuffle": self.shuffle,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; raises ``ConfigError`` if it was saved with other settings."""
        missing = sorted(set(self.state()) - set(state))
        if missing:
            raise ConfigError(f"iterator state lacks {missing}")
        if state["version"] != STATE_VERSION:
            raise ConfigError(
                f"iterator state version {state['version']} is not supported "
                f"(expected {STATE_VERSION})"
            )
        current = {**self.state(), "offset": self.offset, "stride": self.stride}
        state = {"offset": 0, "stride": 1, **state}  # states of whole sources carry neither
        for key in ("seed", "num_examples", "batch_size", "max_length", "packing", "shuffle",
                    "offset", "stride"):  # fmt: skip
            if state[key] != current[key]:
                raise ConfigError(
                    f"iterator state was saved with {key}={state[key]!r}, but this iterator has "
                    f"{key}={current[key]!r}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if (
            epoch < 0
            or not 0 <= position < len(self.examples)
            or position % self.stride != self.offset
        ):
            raise ConfigError(
                f"iterator state position (epoch {epoch}, position {position}) is out of range "
                f"for {len(self.examples)} examples"
            )
        self._packer.finish()
        self.epoch, self.position, self.batches = epoch, position, int(state["batches"])
