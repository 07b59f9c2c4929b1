"""Batches of independent packed streams, so that each process reads only its share of the data.

With ``streams = S``, rows ``[s * B/S, (s + 1) * B/S)`` of every global batch of ``B`` rows come
from stream ``s``: the examples at positions ``s, s + S, s + 2S, ...`` of each epoch's order,
packed into ``B/S`` rows by their own ``SFTBatchIterator``. A stream depends only on the seed,
``S`` and ``s``, so the global batch is the same whatever the number of processes; a process
builds (tokenizes, packs) only the streams of the rows its devices hold.

The resumable state is every stream's position. A process knows only its own streams', so
``state()`` combines them across processes with ``gather`` (``parallel.gather_max``): a
collective, called by every process at each checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from difflora_jax.data.pipeline import SFTBatchIterator
from difflora_jax.errors import ConfigError
from difflora_jax.protocols import Tokenizer

STATE_VERSION = 1


class StreamedBatches:
    """This process's rows (``rows`` of the global batch) of the streamed global batches."""

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        max_length: int,
        streams: int,
        rows: slice,
        seed: int = 0,
        packing: bool = True,
        shuffle: bool = True,
        gather: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        if streams < 1 or batch_size % streams:
            raise ConfigError(
                f"data.streams={streams} must divide batch_size={batch_size} (each stream fills "
                "batch_size / streams rows)"
            )
        per = batch_size // streams
        start, stop = rows.start or 0, batch_size if rows.stop is None else rows.stop
        if start % per or stop % per or not 0 <= start < stop <= batch_size:
            raise ConfigError(
                f"this process holds rows {start}:{stop} of the batch of {batch_size}, which are "
                f"not whole streams of {per} rows (data.streams={streams}): choose data.streams "
                "so that batch_size / streams divides every process's share of the rows"
            )
        self.batch_size, self.streams, self.rows_per_stream = batch_size, streams, per
        self.local_rows = slice(start, stop)
        self.owned = tuple(range(start // per, stop // per))
        self._gather = gather
        self._iterators = {
            s: SFTBatchIterator(
                examples,
                tokenizer,
                batch_size=per,
                max_length=max_length,
                seed=seed,
                packing=packing,
                shuffle=shuffle,
                offset=s,
                stride=streams,
            )
            for s in self.owned
        }

    def __iter__(self) -> StreamedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(self._iterators[s]) for s in self.owned]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def examples_read(self) -> int:
        """How many source examples this process has tokenized (its share of the reading)."""
        return sum(sum(e is not None for e in it._cache) for it in self._iterators.values())

    def state(self) -> dict[str, Any]:
        """Every stream's position (gathered from the processes that own them)."""
        positions = np.full((self.streams, 3), -1, np.int32)
        for s, iterator in self._iterators.items():
            positions[s] = (iterator.epoch, iterator.position, iterator.batches)
        if self._gather is not None:
            positions = self._gather(positions)
        if (positions < 0).any():
            raise ConfigError(
                "some data streams have no owner: the processes' rows do not cover the batch"
            )  # fmt: skip
        settings = next(iter(self._iterators.values())).state()
        return {
            "version": STATE_VERSION,
            "streams": self.streams,
            "positions": positions.tolist(),
            "stream": {
                k: v
                for k, v in settings.items()
                if k not in ("epoch", "position", "batches", "offset")
            },
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue every stream this process owns from ``state`` (saved with any process
        count); a state of another stream count, or of one unstreamed iterator, is refused."""
        if state.get("version") != STATE_VERSION or "positions" not in state:
            raise ConfigError(
                f"the saved data position is not one of {self.streams} streams (data.streams "
                "changed since it was saved?); it cannot be continued"
            )
        if state["streams"] != self.streams:
            raise ConfigError(
                f"the data position was saved with data.streams={state['streams']}, but this run "
                f"has data.streams={self.streams}"
            )
        for s in self.owned:
            epoch, position, batches = state["positions"][s]
            self._iterators[s].restore(
                {**state["stream"], "offset": s, "epoch": epoch, "position": position,
                 "batches": batches}
            )  # fmt: skip
