"""A Llama-family decoder in Flax NNX: embeddings, RMSNorm, RoPE, grouped-query attention,
SwiGLU MLP, tied or untied LM head.

Parameter layout (what sharding rules and the weight loaders see; logical axis names in the
``logical_axes`` metadata of every parameter):

    embed_tokens.embedding            [vocab, embed]
    layers.{i}.input_norm.scale       [embed]
    layers.{i}.attn.q_proj.kernel     [embed, heads, head_dim]
    layers.{i}.attn.k_proj.kernel     [embed, kv_heads, head_dim]
    layers.{i}.attn.v_proj.kernel     [embed, kv_heads, head_dim]
    layers.{i}.attn.o_proj.kernel     [heads, head_dim, embed]
    layers.{i}.mlp_norm.scale         [embed]
    layers.{i}.mlp.gate_proj.kernel   [embed, mlp]
    layers.{i}.mlp.up_proj.kernel     [embed, mlp]
    layers.{i}.mlp.down_proj.kernel   [mlp, embed]
    final_norm.scale                  [embed]
    lm_head.kernel                    [embed, vocab]   (absent with tied embeddings)

Nothing here knows about files, meshes or training.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from difflora_jax.config import REMAT_POLICIES, AdapterConfig, ModelConfig
from difflora_jax.errors import ConfigError
from difflora_jax.modeling.attention import (
    DEFAULT_CAUSAL_BLOCK,
    AttentionMask,
    KVCache,
    LayerCache,
    attention,
    attention_probs,
    make_attention_mask,
)
from difflora_jax.modeling.rope import apply_rope, inverse_frequencies, rope_angles
from difflora_jax.parallel import constrain, current_mesh

_INIT = jax.nn.initializers.normal(stddev=0.02)
# Up to this many rows the tied LM head multiplies table-first (see Embedding.attend); measured
# on a 2-core CPU with SmolLM2's [49152, 576] table: faster at 4-32 rows, slower at 64 and up.
FEW_ROWS = 32
# With this many rows (a decoding step at batch 3-6) a frozen projection on the CPU is taken as
# a loop of matrix-vector products, one per row: XLA:CPU's matmul at 3-6 rows ran 1.2-1.5x slower
# than the same rows one at a time (30 layers of SmolLM2-135M's projections, 2 cores; equal at 2
# and 8 rows). In the optimized HLO, one-row products go to XLA's own dot kernel and products
# of more rows to a YNNPACK fusion.
MATVEC_ROWS = range(3, 7)
# The residual stream between layers under a mesh (parallel.use_mesh): rows split over the
# batch rule's axes, the model dimension whole on every device.
ACTIVATION_AXES = ("batch", "length", None)

# config.REMAT_POLICIES -> the jax.checkpoint policy of one decoder layer (None: no remat)
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert tuple(REMAT) == REMAT_POLICIES

# Set by ``stacked_runs``: ({(start, stop): (variable filter, the run's stacked pure dict)},
# {(start, stop): the run's RNG state after the scan, stacked}).
_STACKED_RUNS: contextvars.ContextVar[tuple[dict, dict] | None] = contextvars.ContextVar(
    "stacked_runs", default=None
)


@contextlib.contextmanager
def stacked_runs(stacks: Mapping[tuple[int, int], tuple[Any, Any]]) -> Iterator[dict]:
    """Inside this context, a scanned run of layers ``(start, stop)`` (``layer_runs``) that
    ``stacks`` lists as ``(kind, values)`` takes its variables of filter ``kind`` from
    ``values`` (one layer's pure-dict structure, every array with a leading axis of
    ``stop - start``) instead of stacking its layers' own. The train step keeps the adapter
    parameters and dropout RNG streams stacked this way (``training.layout``), so gradients
    and advanced streams leave the scan stacked: no per-layer slices, and one optimizer update
    per stacked array rather than per layer's.

    Yields a dict that the forward fills with ``{(start, stop): RNG state}`` (stacked pure
    dicts) of each listed run whose dropout streams advanced; the layers' own streams are
    updated as well, as outside the context."""
    advanced: dict = {}
    token = _STACKED_RUNS.set((dict(stacks), advanced))
    try:
        yield advanced
    finally:
        _STACKED_RUNS.reset(token)


class ProjectionAdapter(Protocol):
    """What a projection needs of the adapter attached to it (``modeling.adapters.LowRank``)."""

    def __call__(self, x: jax.Array, /) -> jax.Array:
        """The adapter's output ``s x A B``, added to the projection's ``x W``."""
        ...

    def delta(self) -> jax.Array:
        """The dense update ``s A B`` of the base kernel (what merging folds in)."""
        ...


class AttentionLayer(Protocol):
    """What a decoder layer needs of its attention: ``Attention``, or the differential
    attention ``modeling.adapters`` puts in its place."""

    attention_backend: str
    causal_block: int | None

    @property
    def cache_heads(self) -> tuple[int, int]:
        """``(key heads, value heads)`` the layer keeps in the KV cache per token."""
        ...

    def attention_maps(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: AttentionMask, /
    ) -> tuple[jax.Array, jax.Array | None]:
        """The positive map and the lambda-scaled negative map (None for standard attention),
        float32 ``[batch, heads, q_len, kv_len]``."""
        ...

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: AttentionMask,
        kv_cache: LayerCache | None = None,
        cache_index: jax.Array | None = None,
        /,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x ``[batch, length, embed]`` -> ``[batch, length, embed]`` and the updated layer cache."""
        ...


def flat_matmul(
    x: jax.Array,
    w: jax.Array,
    n_in: int,
    out_shape: Sequence[int],
    *,
    rowwise_if_few: bool = False,
) -> jax.Array:
    """``x`` ``[..., *in]`` times ``w`` ``[*in, *out]`` -> ``[..., *out]``, computed as one 2-D
    matmul over the flattened token and feature axes (in ``w``'s dtype).

    With ``rowwise_if_few``, on a single CPU device (no current mesh), a product of
    ``MATVEC_ROWS`` rows is taken one row at a time (see ``MATVEC_ROWS``): the same product
    through a different XLA kernel, so float32 roundings may differ in the last bits."""
    lead = x.shape[: x.ndim - n_in]
    fan_in = math.prod(x.shape[x.ndim - n_in :])
    rows = x.reshape(-1, fan_in).astype(w.dtype)
    w2 = w.reshape(fan_in, -1)
    if rowwise_if_few and _matvec_rows_pay(rows.shape[0]):
        # a loop, not one dot per row: XLA:CPU compiles each one-row dot on its own (+10 s
        # for a 30-layer decoding step unrolled over 4 rows; +3-6 s as a loop, as fast)
        y = jax.lax.map(lambda row: row @ w2, rows)
    else:
        y = rows @ w2
    return y.reshape(*lead, *out_shape)


def _matvec_rows_pay(rows: int) -> bool:
    """Whether a frozen projection of ``rows`` rows is faster one row at a time: only on the CPU
    and outside a mesh (under a mesh the rows may be split over devices)."""
    return rows in MATVEC_ROWS and jax.default_backend() == "cpu" and current_mesh() is None


class Projection(nnx.Module):
    """A bias-free linear map contracting the trailing ``len(in_shape)`` input axes."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Sequence[str],
        out_axes: Sequence[str],
        *,
        dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        kernel = _INIT(rngs.params(), self.in_shape + self.out_shape, dtype)
        self.kernel = nnx.Param(kernel, logical_axes=tuple(in_axes) + tuple(out_axes))
        # a LowRank adapter (modeling/adapters.py) once attached
        self.lora: ProjectionAdapter | None = nnx.data(None)

    def base(self, x: jax.Array) -> jax.Array:
        """The frozen map ``x W`` alone, as one 2-D matmul ``[tokens, in] @ [in, out]`` (the
        reshapes are free; XLA:CPU ran the backward of the 3-D contraction 1.5x slower), or one
        matrix-vector product per row for ``MATVEC_ROWS`` rows on the CPU."""
        return flat_matmul(
            x, self.kernel[...], len(self.in_shape), self.out_shape, rowwise_if_few=True
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x W``, plus ``s x A B`` when a LoRA adapter is attached."""
        y = self.base(x)
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMS normalisation in float32 with a learned scale (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, *, dtype: DTypeLike, axis_name: str = "embed"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...]
        return scale * normed.astype(scale.dtype)


class LayerConstant(nnx.Variable):
    """A per-layer constant held as data, not as a Python attribute (e.g. a layer's
    lambda_init): layers that differ only in such values share one graph, so one scan runs
    them. Never trained (filters over ``AdapterParam`` or ``nnx.Param`` skip it)."""


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; the base for the differential variant."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: DTypeLike,
        attention_backend: str,
        rngs: nnx.Rngs,
    ):
        e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads = h
        self.attention_backend = attention_backend
        self.causal_block: int | None = DEFAULT_CAUSAL_BLOCK
        self.q_proj = Projection(
            (e,), (h, d), ("embed",), ("heads", "head_dim"), dtype=dtype, rngs=rngs
        )
        self.k_proj = Projection(
            (e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), dtype=dtype, rngs=rngs
        )
        self.v_proj = Projection(
            (e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), dtype=dtype, rngs=rngs
        )
        self.o_proj = Projection(
            (h, d), (e,), ("heads", "head_dim"), ("embed",), dtype=dtype, rngs=rngs
        )

    @property
    def cache_heads(self) -> tuple[int, int]:
        """``(key heads, value heads)`` this layer keeps in the KV cache per token."""
        return self.k_proj.out_shape[0], self.v_proj.out_shape[0]

    def attention_maps(self, x, cos, sin, mask) -> tuple[jax.Array, jax.Array | None]:
        """``(softmax map, None)``: the float32 map ``[b, heads, t, s]`` (no negative term)."""
        query = apply_rope(self.q_proj(x), cos, sin)
        key = apply_rope(self.k_proj(x), cos, sin)
        probs = attention_probs(query, key, mask)  # [b, kv_heads, groups, t, s]
        b, kv, groups, t, s = probs.shape
        return probs.reshape(b, kv * groups, t, s), None

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: AttentionMask,
        kv_cache: LayerCache | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x ``[batch, length, embed]`` -> ``[batch, length, embed]`` and the updated layer cache."""
        query = apply_rope(self.q_proj(x), cos, sin)  # [batch, length, heads, head_dim]
        key = apply_rope(self.k_proj(x), cos, sin)  # [batch, length, kv_heads, head_dim]
        value = self.v_proj(x)
        if kv_cache is not None:
            assert cache_index is not None  # a cache comes with the slot to write
            # key, value: [batch, max_length, kv_heads, head_dim]
            kv_cache, key, value = kv_cache.write(key, value, cache_index)
        out = attention(
            query,
            key,
            value,
            mask,
            backend=self.attention_backend,
            causal_block=self.causal_block if kv_cache is None else None,
        )
        return self.o_proj(out), kv_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, dtype: DTypeLike, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        self.gate_proj = Projection((e,), (m,), ("embed",), ("mlp",), dtype=dtype, rngs=rngs)
        self.up_proj = Projection((e,), (m,), ("embed",), ("mlp",), dtype=dtype, rngs=rngs)
        self.down_proj = Projection((m,), (e,), ("mlp",), ("embed",), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up``. Its backward keeps only ``gate`` and ``up`` and recomputes the
    sigmoid (autodiff of ``jax.nn.silu`` keeps three more arrays of the MLP's width)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_out):
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    d_gate = d_out * up * (sig * (1 + gate * (1 - sig)))
    return d_gate.astype(gate.dtype), (d_out * (gate * sig)).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: DTypeLike,
        attention_backend: str,
        rngs: nnx.Rngs,
    ):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.attn: AttentionLayer = Attention(
            config, dtype=dtype, attention_backend=attention_backend, rngs=rngs
        )
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None):
        attn_out, kv_cache = self.attn(self.input_norm(x), cos, sin, mask, kv_cache, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return x, kv_cache


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            _INIT(rngs.params(), (vocab, dim), dtype), logical_axes=("vocab", "embed")
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding matrix (tied LM head).

        For a few rows (a decoding step, a prefill's last position) the product is taken
        table-first, ``[vocab, rows]``, and transposed: XLA's CPU matmul then splits the vocab
        over its threads instead of running the whole table on one (SmolLM2-135M at batch 4:
        9.4 ms against 14.1 ms per step on 2 cores; equal at batch 1; slower from 64 rows)."""
        table = self.embedding[...]
        x = x.astype(table.dtype)
        if math.prod(x.shape[:-1]) <= FEW_ROWS:
            by_vocab = jax.lax.dot_general(table, x, (((1,), (x.ndim - 1,)), ((), ())))
            return jnp.moveaxis(by_vocab, 0, -1)
        return jnp.einsum("...d,vd->...v", x, table)


class LlamaForCausalLM(nnx.Module):
    """Llama-family causal LM. ``model(input_ids, attention_mask)`` gives float32 logits."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: DTypeLike = jnp.float32,
        attention_backend: str = "xla",
        rngs: nnx.Rngs,
    ):
        config.validate()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderLayer(config, dtype=dtype, attention_backend=attention_backend, rngs=rngs)
                for _ in range(config.num_layers)
            ]
        )
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        # how the layers run (set_layer_execution): under lax.scan, and what each keeps for
        # the backward pass
        self.scan_layers = True
        self.remat = "none"
        # set by modeling.adapters.apply_adapters
        self.adapter_config: AdapterConfig | None = None
        if not config.tie_word_embeddings:
            self.lm_head = Projection(
                (config.hidden_size,),
                (config.vocab_size,),
                ("embed",),
                ("vocab",),
                dtype=dtype,
                rngs=rngs,
            )

    def set_attention_backend(
        self, backend: str, *, causal_block: int | None = DEFAULT_CAUSAL_BLOCK
    ) -> None:
        """Switch every layer's attention backend (see ``modeling.attention.BACKENDS``) and the
        XLA path's causal block size (None: dense)."""
        for layer in self.layers:
            layer.attn.attention_backend = backend
            layer.attn.causal_block = causal_block

    def set_layer_execution(self, *, scan: bool | None = None, remat: str | None = None) -> None:
        """How the decoder layers run. ``scan``: each run of consecutive layers of one structure
        (``layer_runs``) goes through one ``lax.scan`` over their stacked parameters (compiled
        once, not once per layer); False unrolls them (the same numbers). Generation always runs
        them unrolled, whatever this says. ``remat``: what each layer keeps for the backward
        pass (``config.REMAT_POLICIES``)."""
        if scan is not None:
            self.scan_layers = bool(scan)
        if remat is not None:
            if remat not in REMAT:
                raise ConfigError(f"remat {remat!r} is not one of {list(REMAT)}")
            self.remat = remat

    def layer_runs(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` of each run of consecutive layers that execute as one scan: layers
        of one structure (same modules and shapes; adapters on a subset of layers split the
        stack). One layer per run when ``scan_layers`` is off."""
        n = len(self.layers)
        if not self.scan_layers:
            return tuple((i, i + 1) for i in range(n))
        graphdefs = [nnx.graphdef(layer) for layer in self.layers]
        runs, start = [], 0
        for i in range(1, n + 1):
            if i == n or graphdefs[i] != graphdefs[start]:
                runs.append((start, i))
                start = i
        return tuple(runs)

    def _stack_run(self, start: int, stop: int, given: tuple | None) -> tuple[nnx.State, ...]:
        """The states of layers ``start..stop-1`` stacked on a new leading axis: one state, or
        two (the layers' other variables, then the given stack) under ``stacked_runs``."""
        if given is None:
            states = [nnx.state(self.layers[i]) for i in range(start, stop)]
            return (jax.tree.map(lambda *a: jnp.stack(a), *states),)
        kind, values = given[0][(start, stop)]
        states = [nnx.state(self.layers[i], nnx.Not(kind)) for i in range(start, stop)]
        # a copy of the layer's container (replace_by_pure_dict must not touch the layer)
        stack = jax.tree.map(lambda a: a, nnx.state(self.layers[start], kind))
        nnx.replace_by_pure_dict(stack, values)
        return jax.tree.map(lambda *a: jnp.stack(a), *states), stack

    def _run_layers(self, start, stop, x, rope, mask, cache, index, scan):
        """Layers ``start..stop-1`` (one run) on ``x``: one ``lax.scan`` over their stacked
        states, or (``scan`` False, or a run of one) each layer called on its own weights.
        ``cache``: the run's stacked (keys, values) or None. The layers' dropout RNG states
        advance as if each had been called."""
        layers = [self.layers[i] for i in range(start, stop)]
        graphdef = nnx.graphdef(layers[0])
        cos, sin = rope
        # Only an active dropout advances an RNG stream. Writing unchanged streams back would
        # also be wrong inside an outer transform (generation's decode scan): a Variable may
        # not be set from another trace level.
        dropout = any(
            isinstance(node, nnx.Dropout) and not node.deterministic
            for _, node in nnx.iter_graph(layers[0])
        )

        def body(carry, xs):
            x, keys, values = carry
            states, j = xs
            layer = nnx.merge(graphdef, *states)
            layer_cache = None if keys is None else LayerCache(keys, values, j)
            x, layer_cache = layer(x, cos, sin, mask, layer_cache, index)
            x = constrain(x, ACTIVATION_AXES)  # the layer boundary: rows over the batch axes
            if layer_cache is not None:
                keys, values = layer_cache.keys, layer_cache.values
            return (x, keys, values), nnx.state(layer, nnx.RngState) if dropout else None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT[self.remat], prevent_cse=len(layers) == 1)
        carry = (x, *(cache if cache is not None else (None, None)))
        if len(layers) == 1 or not scan:
            # each layer's own weights, its cache slot static
            rngs = []
            for j, layer in enumerate(layers):
                carry, rng = body(carry, ((nnx.state(layer),), j))
                rngs.append(rng)
        else:
            given = _STACKED_RUNS.get()
            if given is not None and (start, stop) not in given[0]:
                given = None
            stack = self._stack_run(start, stop, given)
            carry, rng = jax.lax.scan(body, carry, (stack, jnp.arange(len(layers))))
            rngs = [jax.tree.map(lambda a, j=j: a[j], rng) for j in range(len(layers))]
            if given is not None and rng is not None:
                given[1][(start, stop)] = nnx.to_pure_dict(rng)
        if dropout:
            for layer, layer_rng in zip(layers, rngs):
                nnx.update(layer, layer_rng)  # the dropout streams advanced inside
        x, keys, values = carry
        return x, None if cache is None else (keys, values)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``[batch, length, vocab]`` (float32) for ``input_ids`` ``[batch, length]``.

        ``attention_mask`` ``[batch, length]`` marks real tokens (1) and padding (0), left or
        right. ``positions`` default to the count of real tokens before each one (so left
        padding does not shift RoPE). ``segment_ids`` restrict attention to the same segment
        (packed sequences; pass per-segment ``positions`` too).
        """
        logits, _ = self.forward(
            input_ids, attention_mask, positions=positions, segment_ids=segment_ids
        )
        return logits

    def forward(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        head: bool = True,
        scan: bool | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits and, when ``cache`` is given, the cache with these tokens written at its index.

        ``last_only``: logits of the last position only (``[batch, 1, vocab]``), skipping the LM
        head elsewhere (prefill needs no more). ``head=False``: the final-norm hidden states
        instead of logits. ``scan``: None runs the layers as ``set_layer_execution`` says; False
        calls each layer on its own weights for this call (no stacking of the weights, no copy
        of a layer's slice of them). The cache's layout (``layer_runs``) is the same either way.
        Generation (``difflora_jax.generation``) runs a view with ``scan`` off altogether, so
        that its cache holds one array per layer as well."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
            if cache is not None:
                raise ValueError("forward with a cache needs explicit positions")
        if cache is None:
            mask = AttentionMask(
                dense=make_attention_mask(
                    attention_mask.astype(bool), jnp.arange(length), segment_ids, segment_ids
                ),
                segments=attention_mask
                if segment_ids is None
                else jnp.where(attention_mask > 0, segment_ids, 0).astype(jnp.int32),
            )
            index = None
        else:
            index = cache.index
            key_valid = jax.lax.dynamic_update_slice_in_dim(
                cache.key_valid, attention_mask.astype(bool), index, 1
            )
            mask = AttentionMask(dense=make_attention_mask(key_valid, index + jnp.arange(length)))
        cos, sin = rope_angles(positions, inverse_frequencies(self.config))
        x = constrain(self.embed_tokens(input_ids), ACTIVATION_AXES)  # [batch, length, embed]
        new_keys, new_values = [], []
        for r, (start, stop) in enumerate(self.layer_runs()):
            run_cache = None if cache is None else (cache.keys[r], cache.values[r])
            x, run_cache = self._run_layers(
                start, stop, x, (cos, sin), mask, run_cache, index,
                self.scan_layers if scan is None else scan,
            )  # fmt: skip
            if run_cache is not None:
                new_keys.append(run_cache[0])
                new_values.append(run_cache[1])
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        if head:
            x = self.embed_tokens.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
            x = x.astype(jnp.float32)
        if cache is not None:
            cache = KVCache(
                keys=tuple(new_keys),
                values=tuple(new_values),
                key_valid=key_valid,
                index=cache.index + length,
            )
        return x, cache

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The final-norm hidden states ``[batch, length, embed]`` that the LM head maps to
        logits (``head_matrix``); what a loss that never holds all logits at once starts from."""
        x, _ = self.forward(
            input_ids, attention_mask, positions=positions, segment_ids=segment_ids, head=False
        )
        return x

    def head_matrix(self) -> tuple[jax.Array, int]:
        """``(matrix, vocab_axis)`` of the LM head: the tied embedding ``[vocab, embed]`` (axis
        0) or the untied kernel ``[embed, vocab]`` (axis 1)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding[...], 0
        return self.lm_head.kernel[...], 1

    def attention_maps(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        query_rows: jax.Array | None = None,
    ) -> list[tuple[jax.Array, jax.Array | None]]:
        """Per layer, ``(positive map, lambda * negative map or None)`` float32 ``[batch,
        heads, queries, length]``, for the rows ``query_rows`` (default: all). The layers run
        one by one (unrolled); meant for analysis (the attention-mass evaluation), not speed."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        positions = default_positions(attention_mask)
        mask = AttentionMask(
            dense=make_attention_mask(attention_mask.astype(bool), jnp.arange(length))
        )
        cos, sin = rope_angles(positions, inverse_frequencies(self.config))
        x = self.embed_tokens(input_ids)
        maps = []
        for layer in self.layers:
            positive, negative = layer.attn.attention_maps(layer.input_norm(x), cos, sin, mask)
            if query_rows is not None:
                positive = positive[:, :, query_rows]
                negative = None if negative is None else negative[:, :, query_rows]
            maps.append((positive, negative))
            x, _ = layer(x, cos, sin, mask)
        return maps

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_length`` tokens."""
        dtype = self.embed_tokens.embedding[...].dtype
        heads = [layer.attn.cache_heads for layer in self.layers]
        runs = [stop - start for start, stop in self.layer_runs()]
        return KVCache.create(heads, batch, max_length, self.config.head_dim, dtype, runs)


def default_positions(attention_mask: jax.Array | np.ndarray) -> jax.Array:
    """RoPE positions ``[batch, length]``: the number of real tokens before each token (0 for
    padding), so left padding does not shift RoPE. The one definition every caller uses."""
    return jnp.maximum(jnp.cumsum(jnp.asarray(attention_mask), axis=-1) - 1, 0).astype(jnp.int32)
