"""Tokenized examples -> fixed ``[batch, max_length]`` training batches.

A batch is a dict of int32 numpy arrays, all ``[batch, max_length]``:

- ``input_ids``: token ids, ``pad_id`` at padding;
- ``targets``: the next token of the same example (``targets[t] = input_ids[t + 1]``);
  ``pad_id`` at the last token of each example and at padding;
- ``loss_mask``: 1 where ``targets[t]`` is a token to learn (an assistant token), 0 at the last
  token of each example (so no loss crosses an example boundary) and at padding;
- ``segment_ids``: 1, 2, 3, ... for the examples packed into a row, 0 at padding;
- ``positions``: restart at 0 for each packed example, 0 at padding.

The model consumes a batch as ``model(input_ids, attention_mask=(segment_ids > 0),
positions=positions, segment_ids=segment_ids)``.

With ``packing=True`` each example goes into the first row of the batch with room left for it
(first fit within the batch); the batch closes at the first example that fits nowhere. With
``packing=False`` each row holds one example, right-padded. Examples longer than
``max_length`` are truncated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from difflora_jax.data.chat import TokenizedExample
from difflora_jax.errors import ConfigError, DataError
from difflora_jax.losses import BATCH_KEYS

# Token-id entries start as padding; the rest (masks, segments, positions) as 0.
_PADDED_WITH_PAD_ID = ("input_ids", "targets")


class BatchPacker:
    """Fills one batch example by example: ``add`` until it returns False, then ``finish``."""

    def __init__(self, batch_size: int, max_length: int, *, packing: bool = True, pad_id: int = 0):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} is invalid: must be >= 1")
        if max_length < 2:
            raise ConfigError(f"max_length={max_length} is invalid: must be >= 2")
        self.batch_size = batch_size
        self.max_length = max_length
        self.packing = packing
        self.pad_id = int(pad_id)
        self._reset()

    def _reset(self) -> None:
        shape = (self.batch_size, self.max_length)
        self._arrays = {
            key: np.full(shape, self.pad_id if key in _PADDED_WITH_PAD_ID else 0, np.int32)
            for key in BATCH_KEYS
        }
        self._fill = [0] * self.batch_size  # tokens used per row
        self._segments = [0] * self.batch_size  # examples per row
        self.num_examples = 0

    @property
    def is_empty(self) -> bool:
        return self.num_examples == 0

    def add(self, example: TokenizedExample) -> bool:
        """Place ``example`` (truncated to ``max_length``); False, leaving the batch unchanged,
        when it fits in no row."""
        if len(example) == 0:
            raise DataError("cannot pack an empty example (0 tokens)")
        length = min(len(example), self.max_length)
        if self.packing:
            row = next(
                (r for r, used in enumerate(self._fill) if used + length <= self.max_length),
                None,
            )
        else:
            row = self.num_examples if self.num_examples < self.batch_size else None
        if row is None:
            return False
        start, end = self._fill[row], self._fill[row] + length
        ids, mask = example.input_ids[:length], example.loss_mask[:length]
        a = self._arrays
        a["input_ids"][row, start:end] = ids
        a["targets"][row, start : end - 1] = ids[1:]
        a["loss_mask"][row, start : end - 1] = mask[1:]
        self._segments[row] += 1
        a["segment_ids"][row, start:end] = self._segments[row]
        a["positions"][row, start:end] = np.arange(length, dtype=np.int32)
        self._fill[row] = end
        self.num_examples += 1
        return True

    def finish(self) -> dict[str, np.ndarray]:
        """The batch (``BATCH_KEYS`` -> int32 ``[batch, max_length]``); the packer starts empty."""
        batch = self._arrays
        self._reset()
        return batch


def pack_examples(
    examples: Iterable[TokenizedExample],
    batch_size: int,
    max_length: int,
    *,
    packing: bool = True,
    pad_id: int = 0,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``examples`` in order (one pass); the last, partly filled batch is yielded
    unless ``drop_remainder``."""
    packer = BatchPacker(batch_size, max_length, packing=packing, pad_id=pad_id)
    for example in examples:
        if not packer.add(example):
            yield packer.finish()
            packer.add(example)
    if not packer.is_empty and not drop_remainder:
        yield packer.finish()
