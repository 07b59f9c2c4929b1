"""Packing tokenized examples into [batch, max_length] rows: hand-checked arrays, boundary and
padding invariants, and that the model sees a packed row as the separate examples."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difflora_jax.data import BATCH_KEYS, BatchPacker, DataError, TokenizedExample, pack_examples
from difflora_jax.errors import ConfigError
from difflora_jax.modeling.llama import LlamaForCausalLM
from tests.tiny import TINY

A = TokenizedExample([10, 11, 12, 13], [0, 0, 1, 1])
B = TokenizedExample([20, 21, 22], [0, 1, 1])
C = TokenizedExample([30, 31, 32, 33, 34], [0, 0, 0, 1, 1])


def test_hand_checked_packed_batch():
    (batch,) = pack_examples([A, B, C], batch_size=2, max_length=8, pad_id=0)
    assert set(batch) == set(BATCH_KEYS)
    assert all(v.dtype == np.int32 and v.shape == (2, 8) for v in batch.values())
    # A (4) and B (3) share row 0; C (5) does not fit after them, so it opens row 1.
    np.testing.assert_array_equal(
        batch["input_ids"], [[10, 11, 12, 13, 20, 21, 22, 0], [30, 31, 32, 33, 34, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["targets"], [[11, 12, 13, 0, 21, 22, 0, 0], [31, 32, 33, 34, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["loss_mask"], [[0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["positions"], [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    )


def test_first_fit_goes_back_to_an_earlier_row():
    small = TokenizedExample([40], [0])
    (batch,) = pack_examples([C, A, small], batch_size=2, max_length=8, pad_id=-1)
    # C -> row 0 (5), A does not fit there -> row 1 (4), the 1-token example fits back in row 0
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 1, 1, 2, 0, 0])
    np.testing.assert_array_equal(batch["input_ids"][0], [30, 31, 32, 33, 34, 40, -1, -1])
    np.testing.assert_array_equal(batch["targets"][0, 4:], [-1, -1, -1, -1])
    np.testing.assert_array_equal(batch["segment_ids"][1], [1, 1, 1, 1, 0, 0, 0, 0])


def test_no_packing_one_example_per_row():
    batches = list(pack_examples([A, B, C], batch_size=2, max_length=6, packing=False, pad_id=0))
    assert len(batches) == 2
    first, second = batches
    np.testing.assert_array_equal(
        first["input_ids"], [[10, 11, 12, 13, 0, 0], [20, 21, 22, 0, 0, 0]]
    )
    np.testing.assert_array_equal(first["loss_mask"], [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(first["segment_ids"], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    # the last batch is padded with an empty row
    np.testing.assert_array_equal(second["input_ids"], [[30, 31, 32, 33, 34, 0], [0] * 6])
    np.testing.assert_array_equal(second["segment_ids"][1], [0] * 6)
    assert len(list(pack_examples([A, B, C], 2, 6, packing=False, drop_remainder=True))) == 1


def test_long_example_is_truncated():
    long = TokenizedExample(np.arange(100, 110), [0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    (batch,) = pack_examples([long], batch_size=1, max_length=6)
    np.testing.assert_array_equal(batch["input_ids"], [[100, 101, 102, 103, 104, 105]])
    np.testing.assert_array_equal(batch["targets"], [[101, 102, 103, 104, 105, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 4, 5]])


def test_packer_refuses_without_changing_the_batch():
    packer = BatchPacker(1, 8)
    assert packer.add(C) and not packer.add(A)
    assert packer.num_examples == 1
    batch = packer.finish()
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 1, 0, 0, 0]])
    assert packer.is_empty


@pytest.mark.parametrize("packing", [True, False])
def test_random_examples_invariants(packing):
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(200):
        n = int(rng.integers(1, 40))
        examples.append(TokenizedExample(rng.integers(1, 1000, n), rng.integers(0, 2, n)))
    max_length = 32
    batches = list(pack_examples(examples, batch_size=4, max_length=max_length, packing=packing))
    seen_loss = 0
    segments = 0
    for b in batches:
        ids, tgt, loss, seg, pos = (b[k] for k in BATCH_KEYS)
        segments += int(sum(len(set(row[row > 0].tolist())) for row in seg))
        # a loss only where the next token is of the same example, and it is the target
        r, t = np.nonzero(loss)
        assert np.all(t < max_length - 1)
        assert np.all(seg[r, t] > 0) and np.all(seg[r, t] == seg[r, t + 1])
        np.testing.assert_array_equal(tgt[r, t], ids[r, t + 1])
        assert np.all(pos[r, t + 1] == pos[r, t] + 1)
        # padding: no loss, id and target pad, position 0
        pad = seg == 0
        assert not loss[pad].any() and not ids[pad].any() and not pos[pad].any()
        # the last token of every example (next token of another segment or padding) has no loss
        last = np.zeros_like(seg, bool)
        last[:, :-1] = (seg[:, :-1] > 0) & (seg[:, :-1] != seg[:, 1:])
        last[:, -1] = seg[:, -1] > 0
        assert not loss[last].any() and not tgt[last].any()
        # positions restart at 0 at each segment start
        starts = (seg > 0) & np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
        assert not pos[starts].any()
        seen_loss += int(loss.sum())
    assert segments == len(examples)
    assert seen_loss == sum(e.num_targets(max_length) for e in examples)


def test_packed_row_equals_separate_examples_in_the_model():
    # random weights set from numpy: an eager (per-op compiled) init would take seconds
    model = nnx.eval_shape(lambda: LlamaForCausalLM(TINY, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        shape = variable.get_value().shape
        variable.set_value(jnp.asarray(rng.normal(0.0, 0.3, shape), jnp.float32))
    forward = nnx.jit(lambda m, ids, mask, pos, seg: m(ids, mask, positions=pos, segment_ids=seg))
    parts = [TokenizedExample([5, 6, 7, 8, 9], [0] * 5), TokenizedExample([3, 1, 4, 1], [0] * 4)]
    (packed,) = pack_examples(parts, batch_size=1, max_length=12, pad_id=0)
    (alone,) = pack_examples(parts, batch_size=2, max_length=12, packing=False, pad_id=0)
    assert packed["segment_ids"].max() == 2 and alone["segment_ids"].max() == 1

    def logits(batch):
        segment_ids = batch["segment_ids"]
        return np.asarray(
            forward(model, batch["input_ids"], segment_ids > 0, batch["positions"], segment_ids)
        )

    packed_logits, alone_logits = logits(packed), logits(alone)
    np.testing.assert_allclose(packed_logits[0, :5], alone_logits[0, :5], atol=1e-5)
    np.testing.assert_allclose(packed_logits[0, 5:9], alone_logits[1, :4], atol=1e-5)
    # and the second example differs when it may attend to the first (no segment_ids)
    unsegmented = np.asarray(
        forward(model, packed["input_ids"], packed["segment_ids"] > 0, packed["positions"], None)
    )
    assert np.abs(unsegmented[0, 5:9] - alone_logits[1, :4]).max() > 1e-3


def test_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size=0"):
        BatchPacker(0, 8)
    with pytest.raises(ConfigError, match="max_length=1"):
        BatchPacker(2, 1)
    with pytest.raises(DataError, match="empty example"):
        BatchPacker(2, 8).add(TokenizedExample([], []))
