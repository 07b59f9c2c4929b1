"""LoRA and DiffLoRA: the adapter Variable type, low-rank adapters, and differential attention.

``AdapterParam`` is deliberately *not* a subclass of ``nnx.Param``: ``nnx.state(model,
AdapterParam)`` is exactly the trainable set (adapters, lambda vectors, group-norm scales,
full-matrix negative terms) and filters over ``nnx.Param`` never pick it up.

Parameter names inside an adapted layer (paper vocabulary):

    attn.q_proj.lora.{a,b}        positive-term adapter of Q1 (LoRA on q, same thing)
    attn.k_proj.lora.{a,b}        positive-term adapter of K1
    attn.negative_q.{a,b}         negative-term adapter of Q2 (or .kernel for the full matrix)
    attn.negative_k.{a,b}         negative-term adapter of K2
    attn.lambda_q1 ... lambda_k2  learned-lambda vectors [head_dim]
    attn.group_norm               group-norm scale [head_dim]
    attn.v_proj.lora, attn.output_branch, mlp.{gate,up,down}_proj.lora
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
from flax import nnx

from difflora_jax.config import LORA_TARGETS, AdapterConfig, ModelConfig
from difflora_jax.modeling.attention import attention_probs, differential_attention
from difflora_jax.modeling.dropout import AdapterDropout, apply_keep_mask, keep_mask_from_words
from difflora_jax.modeling.llama import (
    Attention,
    LayerConstant,
    LlamaForCausalLM,
    Projection,
    flat_matmul,
)
from difflora_jax.modeling.rope import apply_rope


class AdapterParam(nnx.Variable):
    """A trainable parameter added by an adapter method; always float32."""


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LowRank(nnx.Module):
    """``scale * dropout(x) A B`` with A ``[*in_shape, rank]`` and B ``[rank, *out_shape]``.

    Dropout is off (deterministic) by default; the training step runs on
    ``nnx.view(model, deterministic=False)``.

    ``init``: A kaiming-uniform (bound 1/sqrt(fan_in), PEFT's default) or gaussian (std
    1/rank, PEFT's ``gaussian``); B zero, or kaiming-uniform with ``b_init="kaiming"`` (bound
    1/sqrt(rank), the reference code's adapters-only negative term).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Sequence[str],
        out_axes: Sequence[str],
        *,
        rank: int,
        scale: float,
        dropout: float,
        init: str,
        rngs: nnx.Rngs,
        b_init: str = "zeros",
    ):
        self.in_shape, self.out_shape, self.scale = tuple(in_shape), tuple(out_shape), scale
        fan_in = math.prod(self.in_shape)
        if init == "gaussian":
            a = jax.random.normal(rngs.params(), self.in_shape + (rank,), jnp.float32) / rank
        else:
            a = _uniform(rngs.params(), self.in_shape + (rank,), 1 / math.sqrt(fan_in))
        if b_init == "kaiming":
            b = _uniform(rngs.params(), (rank,) + self.out_shape, 1 / math.sqrt(rank))
        else:
            b = jnp.zeros((rank,) + self.out_shape, jnp.float32)
        self.a = AdapterParam(a, logical_axes=tuple(in_axes) + ("rank",))
        self.b = AdapterParam(b, logical_axes=("rank",) + tuple(out_axes))
        self.dropout = nnx.data(AdapterDropout(dropout, rngs=rngs) if dropout > 0 else None)

    def delta(self) -> jax.Array:
        """The dense update this adapter adds to its base kernel: ``scale * A B``, float32
        ``[*in_shape, *out_shape]`` (``x (W + delta) = x W + s x A B``; merging folds it in)."""
        return self.scale * jnp.tensordot(self.a[...], self.b[...], axes=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        dropout = self.dropout
        if dropout is not None:
            words = dropout.hash_words()
            if words is not None:  # hash dropout: the backward recomputes the mask
                a, b = self.a[...], self.b[...]
                return _dropout_low_rank(x, a, b, words, dropout.rate, self.scale, self.out_shape)
            x = dropout(x)
        return _low_rank(x, self.a[...], self.b[...], self.scale, self.out_shape)


def _low_rank(x, a, b, scale: float, out_shape: tuple[int, ...]) -> jax.Array:
    """``scale * x A B`` as two 2-D matmuls (see ``llama.flat_matmul``): ``[tokens, in] @ [in,
    r] @ [r, out]``."""
    h = flat_matmul(x, a, a.ndim - 1, (a.shape[-1],))
    return flat_matmul(h, b, 1, out_shape) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _dropout_low_rank(x, a, b, words, rate: float, scale: float, out_shape) -> jax.Array:
    """``scale * dropout(x) A B`` with the hash mask of ``words`` (``dropout.apply_keep_mask``).

    Autodiff would keep, per adapter, the boolean mask and the dropped-out copy of ``x`` for the
    backward pass; here the backward keeps ``x`` (one array however many adapters read it: the
    q, k and v adapters share their input) and the rank-sized ``dropout(x) A``, and recomputes
    the mask from the two words, which XLA fuses into the matmul operands. The same numbers."""
    return _dropout_low_rank_fwd(x, a, b, words, rate, scale, out_shape)[0]


def _dropout_low_rank_fwd(x, a, b, words, rate, scale, out_shape):
    h = flat_matmul(apply_keep_mask(x, words, rate), a, a.ndim - 1, (a.shape[-1],))
    return flat_matmul(h, b, 1, out_shape) * scale, (x, a, b, words, h)


def _dropout_low_rank_bwd(rate, scale, out_shape, residuals, d_y):
    x, a, b, words, h = residuals
    rank = a.shape[-1]
    a2, b2 = a.reshape(-1, rank), b.reshape(rank, -1)
    d_y = d_y.reshape(-1, b2.shape[1]).astype(b.dtype) * jnp.asarray(scale, b.dtype)
    d_h = d_y @ b2.T  # [tokens, rank]
    d_b = h.reshape(-1, rank).T @ d_y
    dropped = apply_keep_mask(x, words, rate).reshape(-1, a2.shape[0]).astype(a.dtype)
    d_a = dropped.T @ d_h
    keep = keep_mask_from_words(words, x.shape, rate)
    d_dropped = (d_h @ a2.T).reshape(x.shape).astype(x.dtype)
    d_x = jnp.where(keep, d_dropped / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(d_dropped))
    return d_x, d_a.reshape(a.shape), d_b.reshape(b.shape), None


_dropout_low_rank.defvjp(_dropout_low_rank_fwd, _dropout_low_rank_bwd)


class FullRank(nnx.Module):
    """A trainable dense map ``dropout(x) W`` (the full-matrix negative term), kaiming-uniform."""

    def __init__(self, in_dim: int, out_shape, out_axes, *, dropout: float, rngs: nnx.Rngs):
        kernel = _uniform(rngs.params(), (in_dim, *out_shape), 1 / math.sqrt(in_dim))
        self.kernel = AdapterParam(kernel, logical_axes=("embed", *out_axes))
        self.dropout = nnx.data(AdapterDropout(dropout, rngs=rngs) if dropout > 0 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout is not None:
            x = self.dropout(x)
        return flat_matmul(x, self.kernel[...], 1, self.kernel.shape[1:])


def add_lora(projection: Projection, adapter: AdapterConfig, rngs: nnx.Rngs) -> None:
    """Attach a standard LoRA adapter (zero B) to a base projection."""
    axes = projection.kernel.logical_axes
    n_in = len(projection.in_shape)
    projection.lora = LowRank(
        projection.in_shape,
        projection.out_shape,
        axes[:n_in],
        axes[n_in:],
        rank=adapter.rank,
        scale=adapter.scale,
        dropout=adapter.dropout,
        init=adapter.init,
        rngs=rngs,
    )


class DifferentialAttention(nnx.Module):
    """DiffLoRA attention on top of a pretrained layer's frozen projections.

    ``(softmax(Q1 K1^T / sqrt(h)) - lambda softmax(Q2 K2^T / sqrt(h))) V`` per head, computed by
    ``attention.differential_attention`` (on the XLA path a kernel of its own over the shared
    V), or, with ``relu_on_differential``, from the explicit maps.
    """

    def __init__(
        self,
        base: Attention,
        config: ModelConfig,
        adapter: AdapterConfig,
        rngs: nnx.Rngs,
        *,
        layer_index: int,
    ):
        e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads = h
        self.num_kv_heads = kv
        self.attention_backend = base.attention_backend
        self.causal_block = base.causal_block
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            base.q_proj,
            base.k_proj,
            base.v_proj,
            base.o_proj,
        )
        if adapter.positive_term:
            add_lora(self.q_proj, adapter, rngs)
            add_lora(self.k_proj, adapter, rngs)
        if adapter.lora_v:
            add_lora(self.v_proj, adapter, rngs)
        self.negative_term = adapter.negative_term
        if adapter.negative_term == "full":
            self.negative_q = FullRank(
                e, (h, d), ("heads", "head_dim"), dropout=adapter.dropout, rngs=rngs
            )
            self.negative_k = FullRank(
                e, (kv, d), ("kv_heads", "head_dim"), dropout=adapter.dropout, rngs=rngs
            )
        else:
            b_init = "kaiming" if adapter.negative_term == "adapters" else "zeros"
            common: dict[str, Any] = dict(
                rank=adapter.rank,
                scale=adapter.scale,
                dropout=adapter.dropout,
                init=adapter.init,
                rngs=rngs,
                b_init=b_init,
            )
            self.negative_q = LowRank((e,), (h, d), ("embed",), ("heads", "head_dim"), **common)
            self.negative_k = LowRank((e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), **common)
        self.output_branch = nnx.data(
            LowRank(
                (e,),
                (e,),
                ("embed",),
                ("embed",),
                rank=adapter.rank,
                scale=adapter.scale,
                dropout=adapter.dropout,
                init=adapter.init,
                rngs=rngs,
            )
            if adapter.lora_o
            else None
        )
        # data, not a Python float: layers that differ only in lambda_init scan as one
        self.lambda_init = LayerConstant(jnp.float32(adapter.lambda_init_for(layer_index)))
        self.learned_lambda = adapter.lambda_mode == "learned"
        if self.learned_lambda:
            vectors = [0.1 * jax.random.normal(rngs.params(), (d,), jnp.float32) for _ in range(4)]
            if adapter.identity_start:
                # mirrored vectors: exp(q1.k1) - exp(q2.k2) = 0 exactly, so lambda = 0 at step 0
                vectors[2], vectors[3] = vectors[0], vectors[1]
            self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
                AdapterParam(v, logical_axes=("head_dim",)) for v in vectors
            )
        self.group_norm = nnx.data(
            AdapterParam(jnp.ones((d,), jnp.float32), logical_axes=("head_dim",))
            if adapter.group_norm
            else None
        )
        self.relu_on_differential = adapter.relu_on_differential

    @property
    def cache_heads(self) -> tuple[int, int]:
        """``(key heads, value heads)`` cached per token: K1 and K2 stacked (2 x kv_heads) and
        the one V both maps share. A variant with its own negative-term V caches 2 x kv_heads
        values here, and ``__call__`` then uses them as they are."""
        return 2 * self.num_kv_heads, self.num_kv_heads

    def values(self, x: jax.Array) -> jax.Array:
        """V ``[batch, length, value heads, head_dim]`` with ``cache_heads[1]`` heads: the one
        V both maps share (``X W_V``, plus ``lora_v``). The extension point of a variant with
        its own negative-term V: return ``[V1, V2]`` stacked on the head axis (2 x kv_heads,
        and say so in ``cache_heads``); the cache and the attention call follow."""
        return self.v_proj(x)

    def lambda_value(self) -> jax.Array:
        """lambda (float32 scalar): exp(q1.k1) - exp(q2.k2) + lambda_init, or the fixed value."""
        if not self.learned_lambda:
            return self.lambda_init[...]
        positive = jnp.exp(jnp.sum(self.lambda_q1[...] * self.lambda_k1[...]))
        negative = jnp.exp(jnp.sum(self.lambda_q2[...] * self.lambda_k2[...]))
        return positive - negative + self.lambda_init[...]

    def _queries_keys(self, x, cos, sin):
        """RoPE'd ``[Q1; Q2]`` ``[b, t, 2 heads, d]`` and ``[K1; K2]`` ``[b, t, 2 kv_heads, d]``
        stacked on the head axis, and the dtype of the projections."""
        query = self.q_proj.base(x)  # X W_Q: [batch, length, heads, head_dim]
        key = self.k_proj.base(x)  # X W_K: [batch, length, kv_heads, head_dim]
        q1 = query if self.q_proj.lora is None else query + self.q_proj.lora(x).astype(query.dtype)
        k1 = key if self.k_proj.lora is None else key + self.k_proj.lora(x).astype(key.dtype)
        q2 = self.negative_q(x).astype(query.dtype)
        k2 = self.negative_k(x).astype(key.dtype)
        if self.negative_term == "base_plus_adapters":
            q2, k2 = query + q2, key + k2
        queries = apply_rope(jnp.concatenate([q1, q2], axis=2), cos, sin)
        keys = apply_rope(jnp.concatenate([k1, k2], axis=2), cos, sin)
        return queries, keys, query.dtype

    def attention_maps(self, x, cos, sin, mask) -> tuple[jax.Array, jax.Array | None]:
        """``(positive map, lambda * negative map)``, each float32 ``[b, heads, t, s]``: the two
        terms whose difference weighs V (what the paper's attention-mass figure reads)."""
        queries, keys, _ = self._queries_keys(x, cos, sin)
        probs = attention_probs(queries, keys, mask)  # [b, 2 kv_heads, groups, t, s]
        b, _, groups, t, s = probs.shape
        kv = self.num_kv_heads
        positive = probs[:, :kv].reshape(b, kv * groups, t, s)
        negative = probs[:, kv:].reshape(b, kv * groups, t, s)
        return positive, self.lambda_value().astype(jnp.float32) * negative

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None):
        h = self.num_heads
        queries, keys, dtype = self._queries_keys(x, cos, sin)  # [b, t, 2 heads | 2 kv_heads, d]
        value = self.values(x)
        if kv_cache is not None:
            assert cache_index is not None  # a cache comes with the slot to write
            kv_cache, keys, value = kv_cache.write(keys, value, cache_index)
        lam = self.lambda_value()
        if self.relu_on_differential:
            kv = self.num_kv_heads
            probs = attention_probs(queries, keys, mask)  # [b, 2 kv_heads, groups, t, s]
            diff = jax.nn.relu(probs[:, :kv] - lam * probs[:, kv:])
            out = jnp.einsum("bkgts,bskd->btkgd", diff, value.astype(jnp.float32))
            out = out.reshape(*out.shape[:2], h, -1)
        else:  # one V shared by both maps, or [V1; V2] stacked as the keys are
            out = differential_attention(
                queries,
                keys,
                value,
                lam,
                mask,
                backend=self.attention_backend,
                causal_block=self.causal_block if kv_cache is None else None,
            )
        if self.group_norm is not None:
            out = out * jax.lax.rsqrt(jnp.mean(out * out, axis=-1, keepdims=True) + 1e-5)
            out = out * self.group_norm[...] * (1.0 - self.lambda_init[...])
        y = self.o_proj(out.astype(dtype))
        if self.output_branch is not None:
            y = y + self.output_branch(x).astype(y.dtype)
        return y, kv_cache


# LoRA target name (AdapterConfig.targets) -> the projection's module path inside a layer; the
# one map the adapters, the PEFT format and merging all read.
LORA_TARGET_MODULES = {
    "q": ("attn", "q_proj"),
    "k": ("attn", "k_proj"),
    "v": ("attn", "v_proj"),
    "o": ("attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
assert tuple(LORA_TARGET_MODULES) == LORA_TARGETS


def target_projection(layer: nnx.Module, target: str) -> Projection:
    """The base projection of ``layer`` that the LoRA target ``target`` (``"q"``...) adapts."""
    block, name = LORA_TARGET_MODULES[target]
    return getattr(getattr(layer, block), name)


def apply_adapters(model: LlamaForCausalLM, adapter: AdapterConfig) -> LlamaForCausalLM:
    """Add the adapters of ``adapter`` to ``model`` in place (and return it).

    The base weights stay ``nnx.Param`` and untouched; everything added is ``AdapterParam``.
    """
    adapter.validate()
    adapter.check_model(model.config)
    if getattr(model, "adapter_config", None) is not None:
        raise ValueError("this model already carries adapters")
    rngs = nnx.Rngs(params=adapter.seed, dropout=adapter.seed + 1)
    for i in adapter.adapted_layers(model.config.num_layers):
        layer = model.layers[i]
        if adapter.method == "lora":
            for target in adapter.targets:
                add_lora(target_projection(layer, target), adapter, rngs)
        else:
            base = layer.attn
            assert isinstance(base, Attention)  # a model without adapters has base attention
            layer.attn = DifferentialAttention(base, model.config, adapter, rngs, layer_index=i)
            if adapter.lora_mlp:
                for target in ("gate", "up", "down"):
                    add_lora(target_projection(layer, target), adapter, rngs)
    model.adapter_config = adapter
    return model


def adapter_state(model: nnx.Module) -> nnx.State:
    """The trainable set: every ``AdapterParam`` of the model."""
    return nnx.state(model, AdapterParam)


def adapter_arrays(model: nnx.Module) -> dict:
    """The trainable arrays as a pure nested dict (what optimizers and checkpoints hold)."""
    return nnx.to_pure_dict(adapter_state(model))


def write_back(model: nnx.Module, params: dict, rng: dict | None = None) -> None:
    """Put adapter arrays ``params`` (a pure nested dict, as ``adapter_arrays`` gives) and,
    when given, a dropout RNG state into ``model``, in place."""
    state = adapter_state(model)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    if rng is not None and jax.tree.leaves(rng):
        rng_state = nnx.state(model, nnx.RngState)
        nnx.replace_by_pure_dict(rng_state, rng)
        nnx.update(model, rng_state)


def set_adapter_values(model: nnx.Module, values: Mapping[str, Any]) -> None:
    """Set every adapter parameter of ``model`` from ``values`` (flat dotted paths, e.g.
    ``"layers.0.attn.q_proj.lora.a"``), as float32; the names must be exactly the model's."""
    variables = {
        ".".join(str(p) for p in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, AdapterParam)
    }
    if set(variables) != set(values):
        missing, extra = sorted(set(variables) - set(values)), sorted(set(values) - set(variables))
        raise ValueError(
            f"adapter values do not match the model: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, variable in variables.items():
        variable.set_value(jnp.asarray(values[name], jnp.float32))


def is_differential(attention_module: object) -> TypeGuard[DifferentialAttention]:
    """Whether an attention module is DiffLoRA's differential attention (has a lambda)."""
    return isinstance(attention_module, DifferentialAttention)


def lambda_layers(model: LlamaForCausalLM) -> tuple[int, ...]:
    """Indices of the layers whose attention is differential."""
    return tuple(i for i, layer in enumerate(model.layers) if is_differential(layer.attn))


def lambda_values(model: LlamaForCausalLM) -> jax.Array:
    """lambda of every differential layer, float32 ``[len(lambda_layers(model))]``."""
    values = [layer.attn.lambda_value() for layer in model.layers if is_differential(layer.attn)]
    return jnp.stack(values) if values else jnp.zeros((0,), jnp.float32)


def count_adapter_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(adapter_state(model)))


def abstract_adapted_model(config: ModelConfig, adapter: AdapterConfig) -> LlamaForCausalLM:
    """A model of ``config`` carrying ``adapter``, shapes only (nothing is computed)."""
    return nnx.eval_shape(
        lambda: apply_adapters(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), adapter)
    )


def adapter_shapes(config: ModelConfig, adapter: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """``{"layers.0.attn.q_proj.lora.a": (64, 4), ...}``: every adapter parameter's shape."""
    model = abstract_adapted_model(config, adapter)
    return {
        ".".join(str(p) for p in path): tuple(variable.get_value().shape)
        for path, variable in nnx.to_flat_state(adapter_state(model))
    }


def trainable_params_per_layer(config: ModelConfig, adapter: AdapterConfig) -> dict[int, int]:
    """Adapter parameters per layer index, computed from abstract shapes (no weights needed)."""
    model = abstract_adapted_model(config, adapter)
    counts = dict.fromkeys(range(config.num_layers), 0)
    for path, variable in nnx.to_flat_state(adapter_state(model)):
        if path[0] != "layers" or not isinstance(path[1], int):
            raise AssertionError(f"adapter parameter outside the layers: {path}")
        counts[path[1]] += math.prod(variable.get_value().shape)
    return counts
