"""Adapter dropout: an ``nnx.Dropout`` whose mask generator is a setting.

Each adapter keeps its own dropout stream and draws its own mask on every call, as PEFT's
``lora_dropout`` does (one ``nn.Dropout`` per adapted linear): elements are dropped
independently with probability ``rate`` and the kept ones scaled by ``1 / (1 - rate)``.
Two generators make the mask from the stream's key:

``bernoulli``
    ``jax.random.bernoulli`` (what ``nnx.Dropout`` does): one threefry2x32 (or rbg) draw per
    element. On a 2-core CPU this was about a tenth of the SmolLM2-135M LoRA r8 train step.
``hash``
    a counter hash: two 32-bit words drawn from the key, then per element a hash of its
    (row, column) index under those words (two rounds of the ``lowbias32`` integer mixer of
    C. Wellons' hash-prospector), kept when the top 24 bits are at or above
    ``round(rate * 2**24)``. About 12 integer operations per element that XLA fuses into the
    multiply by the mask, instead of threefry's 20 rounds written to memory. A pure function of
    the key and the element's global index, so a sharded step draws the same mask as an
    unsharded one. The keep probability is ``1 - round(rate * 2**24) / 2**24`` (within 3e-8 of
    ``1 - rate``); ``tests/modeling/test_dropout.py`` checks the rate, the scaling and the
    independence of neighbouring elements, of calls and of adapters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

MASK_GENERATORS = ("hash", "bernoulli")
_THRESHOLD_BITS = 24


def _lowbias32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def hash_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean keep mask of ``shape`` (True with probability ``1 - rate``) from ``key``.

    The leading axes are flattened to rows (at most 2**32 of them) and the last axis is the
    column; each row gets its own hashed word, each element a hash of that word and its
    column."""
    return keep_mask_from_words(hash_words(key), shape, rate)


def hash_words(key: jax.Array) -> jax.Array:
    """The two uint32 words that :func:`keep_mask_from_words` hashes with, drawn from ``key``."""
    return jax.random.bits(key, (2,), jnp.uint32)


def keep_mask_from_words(words: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """The keep mask of :func:`hash_keep_mask` from its two ``words`` (``hash_words(key)``): a
    pure function of the words and each element's index, so a backward pass can recompute it
    instead of storing it."""
    rows, cols = math.prod(shape[:-1]), shape[-1]
    if rows >= 2**32 or cols >= 2**32:
        raise ValueError(f"dropout mask of shape {shape}: more than 2**32 rows or columns")
    row = jax.lax.broadcasted_iota(jnp.uint32, (rows, 1), 0)
    col = jax.lax.broadcasted_iota(jnp.uint32, (1, cols), 1)
    row_word = _lowbias32(row * jnp.uint32(0x9E3779B9) + words[0])
    h = _lowbias32(_lowbias32(row_word ^ (col * jnp.uint32(0x85EBCA6B))) + words[1])
    threshold = jnp.uint32(round(rate * 2**_THRESHOLD_BITS))
    keep = (h >> (32 - _THRESHOLD_BITS)) >= threshold
    return keep.reshape(shape)


def apply_keep_mask(x: jax.Array, words: jax.Array, rate: float) -> jax.Array:
    """Dropout of ``x`` by the hash mask of ``words``: kept elements scaled by ``1 / (1 -
    rate)``, the others zero."""
    keep = keep_mask_from_words(words, x.shape, rate)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class AdapterDropout(nnx.Dropout):
    """``nnx.Dropout`` with the mask drawn by ``generator`` (``MASK_GENERATORS``; set for the
    whole model with :func:`set_mask_generator`). Off (deterministic) until a training view
    turns it on, like ``nnx.Dropout``."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs, generator: str = MASK_GENERATORS[0]):
        super().__init__(rate, deterministic=True, rngs=rngs)
        self.generator = generator

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
        off = self.deterministic if deterministic is None else deterministic
        if self.generator == "bernoulli" or off or self.rate == 0.0 or self.rate == 1.0:
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        return apply_keep_mask(inputs, hash_words(self._next_key(rngs)), self.rate)

    def hash_words(self) -> jax.Array | None:
        """The next call's hash-mask words (advancing the stream as that call would), or None
        when this dropout would not draw a hash mask (bernoulli generator, off, rate 0 or 1).
        For callers that apply the mask themselves (``apply_keep_mask``) so that their backward
        can recompute it."""
        if self.generator == "bernoulli" or self.deterministic or self.rate in (0.0, 1.0):
            return None
        return hash_words(self._next_key(None))

    def _next_key(self, rngs) -> jax.Array:
        stream = self.rngs if rngs is None else rngs
        if isinstance(stream, nnx.Rngs):
            return stream[self.rng_collection]()
        if isinstance(stream, nnx.RngStream):
            return stream()
        if isinstance(stream, jax.Array):
            return stream
        raise TypeError(f"dropout needs an Rngs, RngStream or key, got {type(stream)}")


def set_mask_generator(model: nnx.Module, generator: str) -> None:
    """Use ``generator`` (``MASK_GENERATORS``) in every ``AdapterDropout`` of ``model``."""
    if generator not in MASK_GENERATORS:
        raise ValueError(f"mask generator {generator!r}: allowed {list(MASK_GENERATORS)}")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, AdapterDropout):
            node.generator = generator
