"""Streamed batches (data.streams): each process builds only its rows' streams, reading only
their examples, and the global batch is the same however the rows are split; the state of all
streams resumes bit for bit under any split."""

from __future__ import annotations

import numpy as np
import pytest

from difflora_jax.data import SFTBatchIterator, make_mix
from difflora_jax.data.streams import StreamedBatches
from difflora_jax.errors import ConfigError

EXAMPLES = make_mix(60, seed=3)
B, L, S = 8, 256, 4


def _streams(tokenizer, rows, **kwargs):
    return StreamedBatches(
        EXAMPLES, tokenizer, batch_size=B, max_length=L, streams=S, rows=rows, seed=5, **kwargs
    )


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_the_global_batch_does_not_depend_on_the_split(smollm2_tokenizer):
    whole = _take(_streams(smollm2_tokenizer, slice(0, B)), 5)
    halves = [_take(_streams(smollm2_tokenizer, slice(i, i + B // 2)), 5) for i in (0, B // 2)]
    quarters = [_take(_streams(smollm2_tokenizer, slice(i, i + 2)), 5) for i in range(0, B, 2)]
    for step, batch in enumerate(whole):
        for parts in (halves, quarters):
            for key, value in batch.items():
                np.testing.assert_array_equal(
                    value, np.concatenate([p[step][key] for p in parts]), err_msg=key
                )
    assert whole[0]["input_ids"].shape == (B, L)
    assert halves[0][0]["input_ids"].shape == (B // 2, L)


def test_each_part_reads_only_its_streams_examples(smollm2_tokenizer):
    """In an epoch the halves tokenize disjoint sets of examples that together are the
    source: each reads its streams' positions of the epoch's order, half of the source."""
    halves = [_streams(smollm2_tokenizer, slice(i, i + B // 2)) for i in (0, B // 2)]
    for half in halves:
        _take(half, 1)  # tokenizes ahead: the rest of its streams' positions of epoch 0
    read = [
        {i for it in h._iterators.values() for i, e in enumerate(it._cache) if e is not None}
        for h in halves
    ]
    assert not read[0] & read[1]
    assert read[0] | read[1] == set(range(len(EXAMPLES)))
    for half, indices in zip(halves, read):
        assert half.examples_read() == len(indices) == len(EXAMPLES) // 2


def test_a_stream_visits_its_positions_of_each_epoch_order(smollm2_tokenizer):
    """Stream s of S reads positions s, s + S, ... of each epoch's order, then the next epoch."""
    it = SFTBatchIterator(
        EXAMPLES, smollm2_tokenizer, batch_size=2, max_length=L, seed=5, offset=1, stride=S
    )
    positions = []
    for _ in range(12):
        positions.append((it.epoch, it.position))
        next(it)
    assert all(p % S == 1 for _, p in positions)
    assert max(e for e, _ in positions) >= 1  # crossed into a new epoch at position 1 again


def test_state_resumes_under_any_split(smollm2_tokenizer):
    reference = _streams(smollm2_tokenizer, slice(0, B))
    _take(reference, 3)
    state = reference.state()
    want = _take(reference, 3)
    again = _streams(smollm2_tokenizer, slice(0, B))
    again.restore(state)
    for got, expected in zip(_take(again, 3), want):
        np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    second_half = _streams(smollm2_tokenizer, slice(B // 2, B))
    second_half.restore(state)  # saved by one process, continued by another owning half
    for got, expected in zip(_take(second_half, 3), want):
        np.testing.assert_array_equal(got["loss_mask"], expected["loss_mask"][B // 2 :])


def test_bad_streams_and_states_are_refused(smollm2_tokenizer):
    with pytest.raises(ConfigError, match="must divide batch_size"):
        StreamedBatches(EXAMPLES, smollm2_tokenizer, batch_size=8, max_length=L, streams=3,
                        rows=slice(0, 8))  # fmt: skip
    with pytest.raises(ConfigError, match="not whole streams"):
        _streams(smollm2_tokenizer, slice(0, 3))
    plain = SFTBatchIterator(EXAMPLES, smollm2_tokenizer, batch_size=B, max_length=L, seed=5)
    assert "stride" not in plain.state()  # unstreamed states keep their format
    with pytest.raises(ConfigError, match=r"data\.streams"):
        _streams(smollm2_tokenizer, slice(0, B)).restore(plain.state())
    other = StreamedBatches(EXAMPLES, smollm2_tokenizer, batch_size=B, max_length=L, streams=2,
                            rows=slice(0, B), seed=5)  # fmt: skip
    with pytest.raises(ConfigError, match=r"data\.streams=2"):
        _streams(smollm2_tokenizer, slice(0, B)).restore(other.state())
