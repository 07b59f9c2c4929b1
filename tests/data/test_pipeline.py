"""The resumable batch iterator: bit-for-bit resume, epoch coverage and shuffling, skipping
examples without a loss token, and speed on a few thousand examples."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from difflora_jax.data import (
    BATCH_KEYS,
    DataError,
    SFTBatchIterator,
    encode_chats,
    epoch_permutation,
    make_mix,
)
from difflora_jax.errors import ConfigError

SOURCE = make_mix(40, seed=0)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert set(a) == set(b) == set(BATCH_KEYS)
        for key in BATCH_KEYS:
            assert a[key].dtype == b[key].dtype == np.int32
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("packing", [True, False])
def test_resume_bit_for_bit(smollm2_tokenizer, packing):
    kwargs = dict(batch_size=4, max_length=192, seed=7, packing=packing)
    source = SOURCE[:24]
    it = SFTBatchIterator(source, smollm2_tokenizer, **kwargs)
    first = take(it, 5)
    state = json.loads(json.dumps(it.state()))  # survives a JSON round trip
    assert state["batches"] == 5
    rest = take(it, 3)
    assert not np.array_equal(rest[0]["input_ids"], first[0]["input_ids"])
    assert it.epoch >= 1  # 8 batches of 4 rows or more cross the 24-example epoch boundary
    resumed = SFTBatchIterator(source, smollm2_tokenizer, state=state, **kwargs)
    assert_same(take(resumed, 3), rest)
    assert resumed.state() == it.state()
    # restore() on a used iterator rewinds it as well
    it.restore(state)
    assert_same(take(it, 3), rest)
    # and a fresh iterator replays the same stream
    assert_same(take(SFTBatchIterator(source, smollm2_tokenizer, **kwargs), 5), first)


def test_each_epoch_visits_every_example_once_in_a_new_order(smollm2_tokenizer):
    source = make_mix(12, seed=1)
    tokenized = encode_chats(source, smollm2_tokenizer, max_length=256)
    index_of = {tuple(t.input_ids.tolist()): i for i, t in enumerate(tokenized)}
    it = SFTBatchIterator(
        source, smollm2_tokenizer, batch_size=4, max_length=256, packing=False, seed=3
    )
    orders = []
    for _ in range(2):
        order = []
        for batch in take(it, 3):
            for row in range(4):
                ids = batch["input_ids"][row][batch["segment_ids"][row] > 0]
                order.append(index_of[tuple(ids.tolist())])
        orders.append(order)
    assert orders[0] == epoch_permutation(12, 3, 0).tolist()
    assert orders[1] == epoch_permutation(12, 3, 1).tolist()
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(12))
    assert orders[0] != orders[1]
    unshuffled = SFTBatchIterator(
        source, smollm2_tokenizer, batch_size=4, max_length=256, packing=False, shuffle=False
    )
    first = next(unshuffled)["input_ids"][0]
    np.testing.assert_array_equal(first[: len(tokenized[0])], tokenized[0].input_ids)


def test_packed_batches_learn_exactly_the_answers(smollm2_tokenizer):
    tok = smollm2_tokenizer
    it = SFTBatchIterator(SOURCE, tok, batch_size=2, max_length=512, seed=0)
    batch = next(it)
    assert batch["segment_ids"].max() >= 2  # several examples share a row
    answers = []
    for row in range(2):
        seg, loss, tgt = batch["segment_ids"][row], batch["loss_mask"][row], batch["targets"][row]
        for s in range(1, seg.max() + 1):
            answers.append(tok.decode(tgt[(seg == s) & (loss == 1)]))
    order = epoch_permutation(len(SOURCE), 0, 0)
    expected = [SOURCE[i]["answer"] + "<|im_end|>" for i in order[: len(answers)]]
    assert sorted(answers) == sorted(expected)


def test_examples_without_loss_are_skipped(smollm2_tokenizer):
    long_question = {
        "messages": [
            {"role": "user", "content": "word " * 300},
            {"role": "assistant", "content": "ok"},
        ]
    }
    source = [long_question, SOURCE[3], long_question]
    it = SFTBatchIterator(
        source, smollm2_tokenizer, batch_size=1, max_length=128, shuffle=False, packing=False
    )
    for _ in range(3):  # every batch holds example 1, the only one with a loss token in range
        batch = next(it)
        assert batch["segment_ids"].max() == 1 and batch["loss_mask"].sum() > 0
    with pytest.raises(DataError, match="no example has an assistant token within max_length=128"):
        next(SFTBatchIterator([long_question], smollm2_tokenizer, batch_size=1, max_length=128))


def test_state_mismatch_and_bad_arguments(smollm2_tokenizer):
    it = SFTBatchIterator(SOURCE, smollm2_tokenizer, batch_size=2, max_length=128)
    state = it.state()
    with pytest.raises(ConfigError, match="saved with batch_size=2, but this iterator has"):
        SFTBatchIterator(SOURCE, smollm2_tokenizer, batch_size=3, max_length=128, state=state)
    with pytest.raises(ConfigError, match="saved with num_examples=40"):
        SFTBatchIterator(SOURCE[:10], smollm2_tokenizer, batch_size=2, max_length=128, state=state)
    with pytest.raises(ConfigError, match="out of range"):
        it.restore({**state, "position": 40})
    with pytest.raises(ConfigError, match="lacks"):
        it.restore({"epoch": 0})
    with pytest.raises(DataError, match="source is empty"):
        SFTBatchIterator([], smollm2_tokenizer, batch_size=2, max_length=128)
    bad = SFTBatchIterator([{"messages": []}], smollm2_tokenizer, batch_size=2, max_length=128)
    with pytest.raises(DataError, match="example 0: 'messages' is empty"):
        next(bad)


def test_tokenizes_thousands_of_examples_in_seconds(smollm2_tokenizer):
    source = make_mix(2000, seed=5)
    it = SFTBatchIterator(source, smollm2_tokenizer, batch_size=8, max_length=256)
    start = time.perf_counter()
    it.tokenize()
    batches = take(it, 20)
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"tokenizing 2000 examples and packing 20 batches took {elapsed:.1f} s"
    filled = np.mean([(b["segment_ids"] > 0).mean() for b in batches])
    assert filled > 0.6  # packing keeps most of each row busy
