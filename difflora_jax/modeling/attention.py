"""Attention: masks, the KV cache, and one attention function with a backend switch.

The standard Llama attention calls :func:`attention`. The differential attention of DiffLoRA
stacks its positive and negative queries and keys along the head axis and calls
:func:`differential_attention`: on the XLA path its own kernel that reads the shared V in place
(no copy of V per map) and takes its backward's row terms from the two maps' saved outputs, on
the other backends one :func:`attention` call over the stacked heads, combined after.
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
# Query rows per block of the XLA path's causal block skipping (None: one dense block). Smaller
# blocks skip more of the masked triangle but add ops (compile time grows with their number).
# SmolLM2-135M DiffLoRA-32 train step at 4 x 512 on a 2-core CPU, one interleaved A/B: blocks of
# 64: 15.7 s, 128: 14.9 s, 256: 16.9 s. Again with freed memory kept (host_memory), two rounds
# of `difflora bench train --causal-block B`: LoRA r8 64: 16.70 / 16.97 s, 128: 16.29 / 16.77 s;
# DiffLoRA-32 64: 18.58 / 20.04 s, 128: 17.66 / 18.44 s (alone, one layer's forward and backward
# favoured 64, 78 against 86 ms, but the whole step did not).
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


def _heads_major(query, key, value) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries ``[b, kv_heads, groups, t, d]``, keys and values ``[b, kv_heads, s, d]``: the
    layout the blocks' batched matmuls read, made once per call (transposing per block, inside
    each einsum, cost the 4 x 512 LoRA step about 7%)."""
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    q = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    return q, key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)


_f32_einsum = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)


def _masked_logits(q, k, mask, scale: float) -> jax.Array:
    """float32 scaled logits ``[b, kv_heads, groups, t, s]`` of head-major ``q`` and ``k``,
    ``_MASK_VALUE`` where ``mask`` ``[b, 1, t, s]`` is False."""
    logits = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, :, None, :, :], logits * jnp.float32(scale), _MASK_VALUE)


def _block_softmax(q, k, mask, scale: float, start: int, stop: int, n: int):
    """``(unnormalized, top, total)`` of query rows ``[start, stop)`` of head-major ``q``
    against the first ``n`` keys: the float32 exponentials of the masked logits after
    subtracting each row's maximum ``top``, and their row sum ``total`` (``[..., 1]``), so the
    softmax maps are ``unnormalized / total``."""
    logits = _masked_logits(q[:, :, :, start:stop], k[:, :, :n], mask[:, :, start:stop, :n], scale)
    top = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - top)
    return unnormalized, top, jnp.sum(unnormalized, axis=-1, keepdims=True)


def _block_probs(q, k, mask, scale, start, stop, n, top, total):
    """Block ``[start, stop)`` of the float32 softmax maps of head-major ``q`` against the first
    ``n`` keys, from each row's saved maximum ``top`` and normaliser ``total``."""
    logits = _masked_logits(q[:, :, :, start:stop], k[:, :, :n], mask[:, :, start:stop, :n], scale)
    return jnp.exp(logits - top[:, :, :, start:stop]) / total[:, :, :, start:stop]


def _blocks_forward(q, k, v, mask, scale: float, block: int | None, out_dtype):
    """``(out, top, total)`` of head-major inputs: the output ``[b, kv_heads, groups, t, d]``
    and, per row, the float32 maximum of its masked logits and the sum of their exponentials
    after subtracting it (``[b, kv_heads, groups, t, 1]``), from which the backward recomputes
    the probabilities exactly. (Not one log-sum-exp: in a row without a valid key ``top +
    log(total)`` rounds to ``top``.)

    Each block's exponentials weigh ``v`` before they are normalised, and the ``[t, d]``
    product is divided by ``total`` (one pass over the ``[t, s]`` map fewer than normalising
    the map). With ``k`` holding a multiple of ``v``'s heads (the differential attention's
    ``[K1; K2]`` over one shared V), each group of ``v.shape[1]`` key heads weighs ``v`` in
    turn and ``out`` stacks the results on the heads axis (``[O1; O2]``)."""
    kv = v.shape[1]
    outs, tops, totals = [], [], []
    for start, stop, n in _query_blocks(q.shape[3], k.shape[2], block):
        unnormalized, top, total = _block_softmax(q, k, mask, scale, start, stop, n)
        weights = unnormalized.astype(v.dtype)
        maps = [weights[:, i : i + kv] for i in range(0, weights.shape[1], kv)]
        out = [_f32_einsum("bkgts,bksd->bkgtd", m, v[:, :, :n]) for m in maps]
        out = out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)
        outs.append((out / total).astype(out_dtype))
        tops.append(top)
        totals.append(total)
    if len(outs) == 1:
        return outs[0], tops[0], totals[0]
    cat = functools.partial(jnp.concatenate, axis=3)
    return cat(outs), cat(tops), cat(totals)


def _from_heads_major(out_h: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``[b, kv_heads, groups, t, d]`` back to ``shape`` ``[b, t, heads, d]``."""
    return out_h.transpose(0, 3, 1, 2, 4).reshape(shape)


def _zeros_transposed(keys: jax.Array) -> jax.Array:
    """float32 zeros ``[b, kv_heads, d, s]`` for head-major ``keys`` ``[b, kv_heads, s, d]``: the
    backward accumulates dK and dV transposed (see :func:`_transposed_key_grad`)."""
    batch, heads, length, dim = keys.shape
    return jnp.zeros((batch, heads, dim, length), jnp.float32)


def _transposed_key_grad(rows: jax.Array, maps: jax.Array) -> jax.Array:
    """``rows^T maps``: float32 ``[b, kv_heads, d, s]`` from ``rows`` ``[b, kv_heads, g, t, d]``
    and ``maps`` ``[b, kv_heads, g, t, s]``, summed over the query heads and rows ``(g, t)``:
    dV (rows dO, maps P) and dK (rows Q, maps dS), transposed. Written this way the big ``[t,
    s]`` map is the right operand in its own layout; the ``[s, d]`` form (``maps^T rows``) made
    XLA:CPU copy each map transposed first, a third of the attention backward's time (1 x 2048
    and 4 x 512, bit-identical results)."""
    return _f32_einsum("bkgtd,bkgts->bkds", rows, maps)


def _logit_grad(probs, d_probs, delta, visible, scale: float) -> jax.Array:
    """The softmax backward to the scaled logits: ``scale * P * (dP - delta)`` with ``delta =
    rowsum(P dP)`` (``[..., 1]``); masked logits are constants, so no gradient there, even in
    rows without a valid key."""
    return jnp.where(visible, probs * (d_probs - delta), 0.0) * jnp.float32(scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _xla_attention(query, key, value, mask, scale: float, block: int | None) -> jax.Array:
    """Softmax attention on the XLA path, in query blocks (``block``: causal prefixes) or one
    dense block (None). Its backward recomputes each block's probabilities from the queries,
    keys and each row's saved maximum and normaliser (as flash attention does), so training
    keeps ``q, k, v``, the output and two floats per row instead of every block's logits,
    exponentials, probabilities and mask: recomputing the logits is cheaper on a CPU than
    writing and reading them back, and long sequences fit (DiffLoRA at 1 x 2048 ran out of 24
    GiB with autodiff's residuals)."""
    return _xla_attention_fwd(query, key, value, mask, scale, block)[0]


def _xla_attention_fwd(query, key, value, mask, scale, block):
    q, k, v = _heads_major(query, key, value)
    out_h, top, total = _blocks_forward(q, k, v, mask, scale, block, query.dtype)
    return _from_heads_major(out_h, query.shape), (q, k, v, mask, out_h, top, total)


def _xla_attention_bwd(scale, block, residuals, d_out):
    q, k, v, mask, out_h, top, total = residuals
    batch, kv_heads, groups, q_len, head_dim = q.shape
    d_o = d_out.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    d_o = d_o.astype(jnp.float32)
    # D = rowsum(dO * O) = sum_s P dP: the softmax backward's per-row term, [b, k, g, t]
    delta = jnp.einsum("bkgtd,bkgtd->bkgt", d_o, out_h.astype(jnp.float32))
    d_q, d_k_t, d_v_t = [], _zeros_transposed(k), _zeros_transposed(v)
    for start, stop, n in _query_blocks(q_len, k.shape[2], block):
        q_i = q[:, :, :, start:stop]
        probs = _block_probs(q, k, mask, scale, start, stop, n, top, total)
        d_o_i = d_o[:, :, :, start:stop]
        d_v_t = d_v_t.at[..., :n].add(_transposed_key_grad(d_o_i, probs))
        d_probs = _f32_einsum("bkgtd,bksd->bkgts", d_o_i, v[:, :, :n])
        visible = mask[:, :, None, start:stop, :n]
        d_logits = _logit_grad(probs, d_probs, delta[:, :, :, start:stop, None], visible, scale)
        d_q.append(_f32_einsum("bkgts,bksd->bkgtd", d_logits, k[:, :, :n]))
        d_k_t = d_k_t.at[..., :n].add(_transposed_key_grad(q_i, d_logits))
    d_q = d_q[0] if len(d_q) == 1 else jnp.concatenate(d_q, axis=3)
    shape = (batch, q_len, kv_heads * groups, head_dim)
    return (
        _from_heads_major(d_q, shape).astype(q.dtype),
        d_k_t.transpose(0, 3, 1, 2).astype(k.dtype),
        d_v_t.transpose(0, 3, 1, 2).astype(v.dtype),
        None,
    )


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def differential_attention(
    queries: jax.Array,
    keys: jax.Array,
    value: jax.Array,
    lam: jax.Array,
    mask: jax.Array | AttentionMask,
    *,
    backend: str = "xla",
    scale: float | None = None,
    causal_block: int | None = None,
) -> jax.Array:
    """Differential attention ``(softmax(Q1 K1^T) - lam softmax(Q2 K2^T)) V`` per head.

    queries ``[batch, q_len, 2 heads, head_dim]`` (``[Q1; Q2]`` stacked on the head axis), keys
    ``[batch, kv_len, 2 kv_heads, head_dim]`` (``[K1; K2]``), value ``[batch, kv_len, kv_heads,
    head_dim]`` (the one V both maps weigh) or ``2 kv_heads`` (``[V1; V2]``, one per map); lam a
    float32 scalar. Returns float32 ``[batch, q_len, heads, head_dim]``. Mask, scale and
    ``causal_block`` as in :func:`attention`.

    On the XLA path with a shared V (the paper's method), a kernel of its own: forward, both
    maps weigh the one V (``O1 = P1 V``, ``O2 = P2 V``, no V copied per map) and ``O1 - lam
    O2`` is returned; backward, one ``dV`` and one ``dD = dO V^T`` product serve both maps (of
    ``D = P1 - lam P2``), both maps are recomputed from the saved per-row maximum and normaliser
    (as :func:`attention` does), and the softmax backward's row terms ``rowsum(P_i dP_i)`` and
    the gradient of lambda come from ``dO . O_i`` on the saved outputs instead of sums over the
    maps. Otherwise (the other backends, or a V per map) it is one :func:`attention` call over
    the stacked heads, combined after.
    """
    _, q_len, heads2, head_dim = queries.shape
    heads, kv_heads = heads2 // 2, keys.shape[2] // 2
    lam = jnp.asarray(lam, jnp.float32)
    fused = backend == "xla" or (backend == "pallas" and q_len != keys.shape[1])
    if not fused or value.shape[2] != kv_heads:
        values = value if value.shape[2] == 2 * kv_heads else jnp.concatenate([value, value], 2)
        both = attention(
            queries, keys, values, mask, backend=backend, scale=scale, causal_block=causal_block
        )
        return both[:, :, :heads].astype(jnp.float32) - lam * both[:, :, heads:].astype(jnp.float32)
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} is not a multiple of kv heads {kv_heads}")
    scale = float(head_dim**-0.5 if scale is None else scale)
    dense = mask.dense if isinstance(mask, AttentionMask) else mask
    causal = causal_block is not None and q_len == keys.shape[1] and q_len > causal_block
    return _xla_differential(
        queries, keys, value, dense, lam, scale, causal_block if causal else None
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _xla_differential(queries, keys, value, mask, lam, scale: float, block: int | None):
    """The fused differential attention of :func:`differential_attention` (XLA path, shared V),
    float32 ``[b, t, heads, d]``."""
    return _xla_differential_fwd(queries, keys, value, mask, lam, scale, block)[0]


def _xla_differential_fwd(queries, keys, value, mask, lam, scale, block):
    q, k, v = _heads_major(queries, keys, value)  # [b, 2kv, g, t, d], [b, 2kv, s, d], [b, kv, s, d]
    kv = v.shape[1]
    # [O1; O2] = [P1 V; P2 V], [b, 2kv, g, t, d]: kept for the backward's row terms
    both, top, total = _blocks_forward(q, k, v, mask, scale, block, jnp.float32)
    batch, q_len, heads2, head_dim = queries.shape
    out = _from_heads_major(
        both[:, :kv] - lam * both[:, kv:], (batch, q_len, heads2 // 2, head_dim)
    )
    return out, (q, k, v, mask, lam, top, total, both)


def _xla_differential_bwd(scale, block, residuals, d_out):
    q, k, v, mask, lam, top, total, both = residuals
    batch, kv2, groups, q_len, head_dim = q.shape
    kv = kv2 // 2
    d_o = d_out.reshape(batch, q_len, kv, groups, head_dim).transpose(0, 2, 3, 1, 4)
    d_o = d_o.astype(jnp.float32)  # [b, kv, g, t, d]
    # the softmax backward's row terms rowsum(P_i dP_i) from the saved outputs: with dP1 = dD
    # and dP2 = -lam dD (dD = dO V^T, the gradient of P1 - lam P2), rowsum(P_i dD) = dO . O_i;
    # the -lam of map 2 is applied with its scale below. dlam = sum(-dO . O2).
    delta1 = jnp.einsum("bkgtd,bkgtd->bkgt", d_o, both[:, :kv])[..., None]
    delta2 = jnp.einsum("bkgtd,bkgtd->bkgt", d_o, both[:, kv:])[..., None]
    d_lam = -jnp.sum(delta2)
    d_q, d_k_t, d_v_t = [], _zeros_transposed(k), _zeros_transposed(v)
    for start, stop, n in _query_blocks(q_len, k.shape[2], block):
        probs = _block_probs(q, k, mask, scale, start, stop, n, top, total)  # [b, 2kv, g, t, n]
        positive, negative = probs[:, :kv], probs[:, kv:]
        d_o_i = d_o[:, :, :, start:stop]
        d_v_t = d_v_t.at[..., :n].add(_transposed_key_grad(d_o_i, positive - lam * negative))
        d_diff = _f32_einsum("bkgtd,bksd->bkgts", d_o_i, v[:, :, :n])  # d(P1 - lam P2)
        visible = mask[:, :, None, start:stop, :n]
        d_logits = jnp.concatenate(
            [
                _logit_grad(positive, d_diff, delta1[:, :, :, start:stop], visible, scale),
                _logit_grad(negative, d_diff, delta2[:, :, :, start:stop], visible, scale) * -lam,
            ],
            axis=1,
        )
        d_q.append(_f32_einsum("bkgts,bksd->bkgtd", d_logits, k[:, :, :n]))
        d_k_t = d_k_t.at[..., :n].add(_transposed_key_grad(q[:, :, :, start:stop], d_logits))
    d_q = d_q[0] if len(d_q) == 1 else jnp.concatenate(d_q, axis=3)
    return (
        _from_heads_major(d_q, (batch, q_len, kv2 * groups, head_dim)).astype(q.dtype),
        d_k_t.transpose(0, 3, 1, 2).astype(k.dtype),
        d_v_t.transpose(0, 3, 1, 2).astype(v.dtype),
        None,
        d_lam.astype(lam.dtype),
    )


_xla_differential.defvjp(_xla_differential_fwd, _xla_differential_bwd)


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


@struct.dataclass
class LayerCache:
    """One layer's place in a run of the KV cache: the run's stacked ``keys`` and ``values``
    (``[run length, batch, max_length, heads, head_dim]``, as in ``KVCache``) and the layer's
    index ``layer`` in them.

    ``write`` puts new tokens into the stacks in place, so a decoding step writes one slot per
    layer, not a copy of the layer's whole cache (which costs a step time linear in the cache
    length). Attention still reads a copy of the layer's slice, made once per call and fused
    by XLA with the transpose to the heads-major layout it computes in."""

    keys: jax.Array
    values: jax.Array
    layer: jax.Array | int

    def write(
        self, key: jax.Array, value: jax.Array, index: jax.Array
    ) -> tuple[LayerCache, jax.Array, jax.Array]:
        """Write ``key`` and ``value`` ``[batch, n, heads, head_dim]`` at slot ``index``; returns
        the updated cache and this layer's keys and values ``[batch, max_length, heads,
        head_dim]`` with them in place."""
        at = (self.layer, 0, index, 0, 0)
        keys = jax.lax.dynamic_update_slice(self.keys, key[None].astype(self.keys.dtype), at)
        values = jax.lax.dynamic_update_slice(
            self.values, value[None].astype(self.values.dtype), at
        )
        return LayerCache(keys, values, self.layer), keys[self.layer], values[self.layer]
