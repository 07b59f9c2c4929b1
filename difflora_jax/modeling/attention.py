"""Attention: masks, the KV cache, and one attention function with a backend switch.

Every caller (the standard Llama attention here, the differential attention of DiffLoRA) goes
through :func:`attention`. The differential variant stacks its positive and negative queries
along the head axis and calls it once (see ``modeling/adapters.py``), so there is a single
attention path to optimise per backend.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from difflora_jax.errors import ConfigError

# xla: our einsum path with causal block skipping (the reference; every platform).
# jax: jax.nn.dot_product_attention, XLA implementation (every platform).
# cudnn: jax.nn.dot_product_attention with implementation="cudnn" (NVIDIA GPUs, float16 or
#   bfloat16 only; XLA raises on other platforms).
# pallas: JAX's Pallas flash-attention kernel (jax.experimental.pallas.ops.gpu.attention,
#   Triton) on GPUs, run by the Pallas interpreter elsewhere (CPU: slow, for tests). Used for
#   self-attention without a cache (training, prefill of an empty cache); with a cache
#   (decoding) it falls back to the xla path.
BACKENDS = ("xla", "jax", "cudnn", "pallas")
# Query rows per block of the XLA path's causal block skipping (None: one dense block). On a
# 2-core CPU, attention forward + backward at [4, 512, 9 heads, 64]: dense 156 ms, blocks of
# 256: 115 ms, 128: 84 ms, 64: 84 ms, 32: 81 ms (18 heads: 322, 227, 181, 159, 175 ms). Smaller
# blocks skip more of the masked triangle but add ops (compile time grows with their number).
DEFAULT_CAUSAL_BLOCK = 128
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def make_attention_mask(
    key_valid: jax.Array,
    query_slots: jax.Array,
    query_segments: jax.Array | None = None,
    key_segments: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask ``[batch, 1, q_len, kv_len]``: causal by slot, padding and packing aware.

    ``key_valid`` ``[batch, kv_len]`` marks real (non-padding) keys; ``query_slots`` ``[q_len]``
    gives each query's slot in the key sequence (``arange(q_len)`` without a cache, the cache
    index plus that while decoding). A query attends to keys at slots ``<=`` its own that are
    valid and, when segment ids are given (packed sequences), in the same segment.
    """
    kv_len = key_valid.shape[1]
    causal = jnp.arange(kv_len)[None, :] <= query_slots[:, None]  # [q_len, kv_len]
    mask = causal[None, None, :, :] & key_valid[:, None, None, :].astype(bool)
    if query_segments is not None:
        if key_segments is None:
            key_segments = query_segments
        same = query_segments[:, :, None] == key_segments[:, None, :]
        mask = mask & same[:, None, :, :]
    return mask


@struct.dataclass
class AttentionMask:
    """What attention may see, in the forms the backends take.

    dense: ``[batch, 1, q_len, kv_len]`` boolean (every backend can use it). segments: for
    self-attention without a cache only (query ``t`` at key slot ``t``): ``[batch, length]``
    int32, the packed segment id of each token and 0 for padding; the kernels that take
    segment ids and a causal flag instead of a dense mask (pallas) read it.
    """

    dense: jax.Array
    segments: jax.Array | None = None


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | AttentionMask,
    *,
    backend: str = "xla",
    scale: float | None = None,
    causal_block: int | None = None,
) -> jax.Array:
    """Softmax attention with grouped-query heads.

    query ``[batch, q_len, heads, head_dim]``; key, value ``[batch, kv_len, kv_heads, head_dim]``
    with ``heads`` a multiple of ``kv_heads``; mask ``[batch, 1, q_len, kv_len]`` (True = attend).
    Returns ``[batch, q_len, heads, head_dim]`` in the query's dtype. Logits and softmax are
    float32 whatever the input dtype. Rows with no valid key (left padding) give finite values.

    ``causal_block`` (XLA path): the caller promises the mask is causal with query ``t`` at key
    slot ``t`` (``q_len == kv_len``, no cache); queries then run in blocks of that many rows,
    each against the key prefix it can see, skipping the masked upper triangle (about half the
    work and memory of the dense map on long sequences). The result equals the dense path's at
    every query with at least one valid key.
    """
    _, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} is not a multiple of kv heads {kv_heads}")
    scale = float(head_dim**-0.5 if scale is None else scale)
    segments = mask.segments if isinstance(mask, AttentionMask) else None
    mask = mask.dense if isinstance(mask, AttentionMask) else mask
    if backend == "pallas":
        if segments is not None and q_len == key.shape[1]:
            return _pallas_flash(query, key, value, segments, scale)
        backend = "xla"  # decoding against a cache: no causal self-attention to tile
    if backend == "xla":
        causal = causal_block is not None and q_len == key.shape[1] and q_len > causal_block
        return _xla_attention(query, key, value, mask, scale, causal_block if causal else None)
    if backend in ("jax", "cudnn"):
        return jax.nn.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            scale=scale,
            implementation="cudnn" if backend == "cudnn" else "xla",
        )
    raise ConfigError(f"attention backend {backend!r} is not supported; allowed: {list(BACKENDS)}")


# Query and key rows per tile of the Pallas kernel (the sequence is padded to a multiple).
PALLAS_BLOCK = 128


def _pallas_flash(query, key, value, segments, scale: float) -> jax.Array:
    """Causal flash attention by the Pallas kernel, segments keeping packed sequences (and
    padding, segment 0) apart. Grouped key/value heads are repeated to the query heads."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    _, length, heads, _ = query.shape
    groups = heads // key.shape[2]
    if groups > 1:  # query head j reads key head j // groups (as in attention_probs)
        key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
    block = min(PALLAS_BLOCK, max(16, 1 << (length - 1).bit_length()))
    pad = -length % block
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        query, key, value = (jnp.pad(a, widths) for a in (query, key, value))
        segments = jnp.pad(segments, ((0, 0), (0, pad)))
    sizes = pallas_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=min(block, 64),
        block_kv_dkv=min(block, 64),
        block_q_dq=min(block, 64),
        block_kv_dq=min(block, 64),
    )
    out = pallas_attention.mha(
        query,
        key,
        value,
        segments.astype(jnp.int32),
        sm_scale=scale,
        causal=True,
        block_sizes=sizes,
        interpret=jax.default_backend() != "gpu",
    )
    return jnp.asarray(out)[:, :length]


def _query_blocks(q_len: int, kv_len: int, block: int | None) -> list[tuple[int, int, int]]:
    """``(start, stop, keys)`` per query block: its rows and how many leading keys it reads
    (the causal prefix with blocks, every key without)."""
    if block is None:
        return [(0, q_len, kv_len)]
    return [(s, min(s + block, q_len), min(s + block, q_len)) for s in range(0, q_len, block)]


def _masked_logits(q, key, mask, scale: float) -> jax.Array:
    """float32 ``[b, kv_heads, groups, t, s]`` scaled logits of grouped queries ``q`` ``[b, t,
    kv_heads, groups, d]``, ``_MASK_VALUE`` where ``mask`` ``[b, 1, t, s]`` is False."""
    logits = jnp.einsum("btkgd,bskd->bkgts", q, key, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, :, None, :, :], logits * jnp.float32(scale), _MASK_VALUE)


def _xla_forward(query, key, value, mask, scale: float, block: int | None):
    """``(out, (top, total))``: the attention output ``[b, t, heads, d]`` and, per row, the
    float32 maximum of its masked logits and the sum of their exponentials after subtracting it
    (``[b, kv_heads, groups, t, 1]``), from which the backward recomputes the probabilities
    exactly. (Not one log-sum-exp: in a row without a valid key ``top + log(total)`` rounds
    to ``top``.)"""
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    q = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    outs, tops, totals = [], [], []
    for start, stop, n in _query_blocks(q_len, key.shape[1], block):
        logits = _masked_logits(q[:, start:stop], key[:, :n], mask[:, :, start:stop, :n], scale)
        top = jnp.max(logits, axis=-1, keepdims=True)
        unnormalized = jnp.exp(logits - top)
        total = jnp.sum(unnormalized, axis=-1, keepdims=True)
        probs = (unnormalized / total).astype(value.dtype)
        out = jnp.einsum(
            "bkgts,bskd->btkgd", probs, value[:, :n], preferred_element_type=jnp.float32
        )
        outs.append(out.astype(query.dtype))
        tops.append(top)
        totals.append(total)
    out = outs[0]
    if len(outs) > 1:
        out = jnp.concatenate(outs, axis=1)
        tops, totals = [jnp.concatenate(tops, axis=-2)], [jnp.concatenate(totals, axis=-2)]
    return out.reshape(batch, q_len, heads, head_dim), (tops[0], totals[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _xla_attention(query, key, value, mask, scale: float, block: int | None) -> jax.Array:
    """Softmax attention on the XLA path, in query blocks (``block``: causal prefixes) or one
    dense block (None). Its backward recomputes each block's probabilities from the queries,
    keys and each row's saved maximum and normaliser (as flash attention does), so training keeps
    ``q, k, v``, the output and one float per row instead of every block's logits, exponentials
    and probabilities: the attention's share of a layer's saved activations drops about 5x, and
    recomputing the logits is cheaper on a CPU than writing and reading them back."""
    return _xla_forward(query, key, value, mask, scale, block)[0]


def _xla_attention_fwd(query, key, value, mask, scale, block):
    out, (top, total) = _xla_forward(query, key, value, mask, scale, block)
    return out, (query, key, value, mask, out, top, total)


def _xla_attention_bwd(scale, block, residuals, d_out):
    query, key, value, mask, out, top, total = residuals
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    grouped = (batch, q_len, kv_heads, heads // kv_heads, head_dim)
    q = query.reshape(grouped)
    d_out = d_out.reshape(grouped).astype(jnp.float32)
    # D = rowsum(dO * O) = sum_s P dP: the softmax backward's per-row term, [b, k, g, t]
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out, out.reshape(grouped).astype(jnp.float32))
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    d_query, d_key, d_value = (
        [],
        jnp.zeros(key.shape, jnp.float32),
        jnp.zeros(value.shape, jnp.float32),
    )
    for start, stop, n in _query_blocks(q_len, key.shape[1], block):
        block_mask = mask[:, :, None, start:stop, :n]
        logits = _masked_logits(q[:, start:stop], key[:, :n], mask[:, :, start:stop, :n], scale)
        probs = jnp.exp(logits - top[..., start:stop, :]) / total[..., start:stop, :]
        d_o = d_out[:, start:stop]
        d_value = d_value.at[:, :n].add(f32("bkgts,btkgd->bskd", probs, d_o))
        d_probs = f32("btkgd,bskd->bkgts", d_o, value[:, :n])
        # masked logits are constants: no gradient there, even in rows without a valid key
        d_logits = jnp.where(block_mask, probs * (d_probs - delta[..., start:stop, None]), 0.0)
        d_logits = d_logits * jnp.float32(scale)
        d_query.append(f32("bkgts,bskd->btkgd", d_logits, key[:, :n]))
        d_key = d_key.at[:, :n].add(f32("bkgts,btkgd->bskd", d_logits, q[:, start:stop]))
    d_query = d_query[0] if len(d_query) == 1 else jnp.concatenate(d_query, axis=1)
    return (
        d_query.reshape(query.shape).astype(query.dtype),
        d_key.astype(key.dtype),
        d_value.astype(value.dtype),
        None,
    )


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def attention_probs(
    query: jax.Array,
    key: jax.Array,
    mask: jax.Array | AttentionMask,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Explicit float32 attention maps ``[batch, kv_heads, groups, q_len, kv_len]``.

    Query head ``j`` is ``(j // groups, j % groups)``: the heads sharing one key head are
    adjacent, as in grouped-query attention.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    mask = mask.dense if isinstance(mask, AttentionMask) else mask
    q = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, key, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, :, None, :, :], logits * jnp.float32(scale), _MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


@struct.dataclass
class KVCache:
    """Preallocated keys and values for every layer, plus which slots hold real tokens.

    The layers are held in runs (what the model scans over as one, see
    ``LlamaForCausalLM.layer_runs``): ``keys[r]``, ``values[r]`` are ``[run length, batch,
    max_length, heads, head_dim]`` with the heads the run's layers cache; ``layer(i)`` gives
    layer ``i``'s pair. key_valid: ``[batch, max_length]``; index: the next slot to write (the
    same for the whole batch, since prompts are left-padded to one length).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_valid: jax.Array
    index: jax.Array

    @classmethod
    def create(
        cls,
        heads: Sequence[tuple[int, int]],
        batch: int,
        max_length: int,
        head_dim: int,
        dtype: jnp.dtype,
        runs: Sequence[int] | None = None,
    ) -> KVCache:
        """A zeroed cache; ``heads[i] = (key heads, value heads)`` that layer i caches per token
        (each attention module says so in its ``cache_heads``: a standard layer caches
        ``(kv_heads, kv_heads)``, a differential one K1 and K2 stacked and the shared V).
        ``runs``: the lengths of the runs of consecutive layers stored together (default: one
        layer each); the layers of a run must cache the same heads."""
        runs = [1] * len(heads) if runs is None else list(runs)
        if sum(runs) != len(heads):
            raise ValueError(f"runs {runs} do not cover {len(heads)} layers")
        keys, values, start = [], [], 0
        for length in runs:
            run_heads = set(heads[start : start + length])
            if len(run_heads) != 1:
                raise ValueError(f"layers {start}..{start + length - 1} cache different heads")
            (k, v), start = run_heads.pop(), start + length
            keys.append(jnp.zeros((length, batch, max_length, k, head_dim), dtype))
            values.append(jnp.zeros((length, batch, max_length, v, head_dim), dtype))
        return cls(
            keys=tuple(keys),
            values=tuple(values),
            key_valid=jnp.zeros((batch, max_length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.key_valid.shape[1]

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        """Layer ``i``'s ``(keys, values)``, each ``[batch, max_length, heads, head_dim]``."""
        for keys, values in zip(self.keys, self.values):
            if i < keys.shape[0]:
                return keys[i], values[i]
            i -= keys.shape[0]
        raise IndexError("layer index out of range")


def write_kv(cache_kv: jax.Array, new_kv: jax.Array, index: jax.Array) -> jax.Array:
    """Write ``new_kv`` ``[batch, n, kv_heads, head_dim]`` into the cache at slot ``index``."""
    return jax.lax.dynamic_update_slice_in_dim(cache_kv, new_kv.astype(cache_kv.dtype), index, 1)
