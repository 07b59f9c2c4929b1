"""DiffLoRA's extension points: per-layer cache heads, a differential variant with its own
negative-term V written as one small subclass, and ``LowRank.delta`` (what merging folds in)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.modeling.adapters import DifferentialAttention, LowRank, apply_adapters
from difflora_jax.modeling.llama import Attention, LlamaForCausalLM
from tests.tiny import tiny_config

CONFIG = tiny_config(vocab_size=64)
ADAPTER = AdapterConfig(method="difflora", rank=4, alpha=8.0, negative_term="adapters", layers=(1,))


class OwnValueAttention(DifferentialAttention):
    """A variant whose negative map reads its own V2 = X W_V + s X A B (a test-only variant)."""

    def __init__(
        self, base: Attention, config: ModelConfig, adapter: AdapterConfig, rngs, *, layer_index
    ):
        super().__init__(base, config, adapter, rngs, layer_index=layer_index)
        kv, d, e = config.num_kv_heads, config.head_dim, config.hidden_size
        self.negative_v = LowRank(
            (e,),
            (kv, d),
            ("embed",),
            ("kv_heads", "head_dim"),
            rank=4,
            scale=2.0,
            dropout=0.0,
            init="kaiming",
            rngs=rngs,
            b_init="kaiming",
        )

    @property
    def cache_heads(self) -> tuple[int, int]:
        return 2 * self.num_kv_heads, 2 * self.num_kv_heads

    def values(self, x: jax.Array) -> jax.Array:
        v1 = self.v_proj(x)
        return jnp.concatenate([v1, v1 + self.negative_v(x).astype(v1.dtype)], axis=2)


def _model() -> LlamaForCausalLM:
    return apply_adapters(LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0)), ADAPTER)


def _decode_matches_full_forward(model: LlamaForCausalLM) -> float:
    """Max |logits| difference between prompt-then-one-token decoding over the KV cache and
    one full forward pass, at the last position."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 9)), jnp.int32)
    full = model(ids)[:, -1]
    cache = model.init_cache(2, 16)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    _, cache = model.forward(ids[:, :8], positions=positions[:, :8], cache=cache)
    step, _ = model.forward(ids[:, 8:], positions=positions[:, 8:], cache=cache)
    return float(jnp.max(jnp.abs(step[:, -1] - full)))


def test_the_cache_holds_each_layers_own_heads():
    model = _model()
    cache = model.init_cache(batch=3, max_length=16)
    kv, d = CONFIG.num_kv_heads, CONFIG.head_dim
    (k0, v0), (k1, v1) = cache.layer(0), cache.layer(1)
    assert k0.shape == (3, 16, kv, d)  # layer 0: a plain Llama layer
    assert k1.shape == (3, 16, 2 * kv, d)  # layer 1: K1 and K2
    assert v0.shape == v1.shape == (3, 16, kv, d)  # V shared
    assert _decode_matches_full_forward(model) < 1e-5


def test_a_variant_with_its_own_value_needs_one_subclass():
    plain = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    base_attention = plain.layers[1].attn
    model = apply_adapters(plain, ADAPTER)
    shared = np.asarray(model(jnp.arange(9, dtype=jnp.int32)[None]))
    model.layers[1].attn = OwnValueAttention(
        base_attention, CONFIG, ADAPTER, nnx.Rngs(ADAPTER.seed), layer_index=1
    )
    cache = model.init_cache(batch=2, max_length=16)
    assert cache.layer(1)[1].shape == (2, 16, 2 * CONFIG.num_kv_heads, CONFIG.head_dim)
    own = np.asarray(model(jnp.arange(9, dtype=jnp.int32)[None]))
    assert np.abs(own - shared).max() > 1e-3  # the negative map now reads V2
    assert _decode_matches_full_forward(model) < 1e-5


def test_delta_is_the_update_the_adapter_adds():
    adapter = LowRank(
        (6,),
        (2, 3),
        ("embed",),
        ("heads", "head_dim"),
        rank=4,
        scale=1.5,
        dropout=0.0,
        init="kaiming",
        rngs=nnx.Rngs(0),
        b_init="kaiming",
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 6)), jnp.float32)
    via_delta = jnp.tensordot(x, adapter.delta(), axes=1)
    np.testing.assert_allclose(np.asarray(via_delta), np.asarray(adapter(x)), rtol=1e-5, atol=1e-6)
    assert adapter.delta().shape == (6, 2, 3)
