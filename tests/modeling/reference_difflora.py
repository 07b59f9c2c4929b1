"""An independent NumPy (float64) reference of the tiny Llama forward with LoRA / DiffLoRA.

Written from the method as the DiffLoRA paper describes it (Misrahi et al., "DiffLoRA:
Differential Low-Rank Adapters for Large Language Models", arXiv:2507.23588, its method section
on differential attention with low-rank adapters) and the Llama architecture, not from
``difflora_jax``: nothing here calls a ``difflora_jax`` function. The weights are read out of a
model's parameters by name (the tests check the computation, not the weights), and the adapter
configuration is read field by field; the scale, lambda_init, which layers and terms exist, and
every formula are recomputed here.

Everything is explicit: attention maps per head, grouped-query attention by repeating K/V heads
(query head j uses key head j // (heads / kv_heads), as transformers' ``repeat_kv``),
``(softmax(Q1 K1^T / sqrt(h) + M) - lambda softmax(Q2 K2^T / sqrt(h) + M)) V``.
"""

from __future__ import annotations

import math

import numpy as np

GROUP_NORM_EPS = 1e-5


class TrackedParams:
    """A read-only ``name -> float64 array`` mapping that records which names were read.

    The tests assert that the reference read every parameter of the model: an adapter the spec
    does not call for (which would be trained, and change the output once randomised) fails.
    """

    def __init__(self, params: dict[str, np.ndarray]):
        self._params = {k: np.asarray(v, np.float64) for k, v in params.items()}
        self.used: set[str] = set()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._params:
            raise KeyError(f"the spec calls for parameter {name!r}, which the model lacks")
        self.used.add(name)
        return self._params[name]

    def names(self) -> set[str]:
        return set(self._params)


def adapter_scale(adapter) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (the paper's LoRA scale)."""
    return adapter.alpha / (math.sqrt(adapter.rank) if adapter.use_rslora else adapter.rank)


def reference_lambda_init(adapter, layer_index: int) -> float:
    """lambda_init of a layer (the paper's lambda schedule, and the config docs).

    identity_start: 0 (our function-preserving start). Fixed lambda: the configured constant.
    Learned: a nonzero configured value replaces the schedule 0.8 - 0.6 exp(-0.3 layer).
    """
    if adapter.identity_start:
        return 0.0
    if adapter.lambda_mode == "fixed":
        return float(adapter.lambda_init)
    if adapter.lambda_init is not None and adapter.lambda_init != 0:
        return float(adapter.lambda_init)
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Half-split RoPE of x ``[b, t, n, d]`` at integer positions ``[b, t]`` (default RoPE)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = positions[..., None].astype(np.float64) * inv_freq  # [b, t, d/2]
    angles = np.concatenate([angles, angles], axis=-1)[:, :, None, :]
    rotated = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def attention_map(q: np.ndarray, k: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """softmax(Q K^T / sqrt(h) + M) ``[b, heads, t, s]``; K heads repeated for GQA.

    Rows without any valid key (left-padding queries) are set to 0; the tests compare only
    real tokens' logits, which never read padding rows.
    """
    heads, kv_heads, d = q.shape[2], k.shape[2], q.shape[3]
    k = np.repeat(k, heads // kv_heads, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    scores = np.where(mask[:, None], scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.exp(scores - top)
    total = np.sum(weights, axis=-1, keepdims=True)
    return np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)


def apply_map(probs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``probs`` ``[b, heads, t, s]`` times V ``[b, s, kv_heads, d]`` -> ``[b, t, heads, d]``."""
    v = np.repeat(v, probs.shape[1] // v.shape[2], axis=2)
    return np.einsum("bhts,bshd->bthd", probs, v)


def reference_logits(
    params: dict[str, np.ndarray] | TrackedParams,
    config,
    adapter,
    input_ids,
    attention_mask=None,
    maps: list | None = None,
) -> np.ndarray:
    """float64 logits ``[b, t, vocab]`` of the tiny Llama (``config``: a ModelConfig, read
    field by field) with the adapters of ``adapter`` (an AdapterConfig, or None for the base).

    ``params`` maps dotted parameter names (``layers.0.attn.q_proj.kernel``) to arrays in the
    model's layout: kernels ``[in..., out...]``, LoRA a ``[*in, r]`` and b ``[r, *out]``.
    ``maps``: a list that receives, per layer, ``(positive map, lambda * negative map or None)``
    ``[b, heads, t, s]``.
    """
    p = params if isinstance(params, TrackedParams) else TrackedParams(params)
    ids = np.asarray(input_ids)
    mask2d = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    length = ids.shape[1]
    positions = np.maximum(np.cumsum(mask2d, axis=-1) - 1, 0)
    causal = np.tril(np.ones((length, length), bool))
    mask = causal[None] & mask2d.astype(bool)[:, None, :]  # [b, t, s]

    s = adapter_scale(adapter) if adapter is not None else 0.0
    if adapter is None:
        adapted = set()
    elif adapter.layers is None:
        adapted = set(range(config.num_layers))
    else:
        adapted = set(adapter.layers)
    method = None if adapter is None else adapter.method

    def lora(name: str, x: np.ndarray, n_in: int = 1) -> np.ndarray:
        """s * x A B, contracting the trailing n_in axes of x."""
        a, b = p[name + ".a"], p[name + ".b"]
        h = np.tensordot(x, a, axes=n_in)
        return s * np.tensordot(h, b, axes=1)

    def linear(name: str, x: np.ndarray, n_in: int = 1, adapters: bool = False) -> np.ndarray:
        y = np.tensordot(x, p[name + ".kernel"], axes=n_in)
        return y + lora(name + ".lora", x, n_in) if adapters else y

    x = p["embed_tokens.embedding"][ids]
    eps, theta = config.rms_norm_eps, config.rope_theta
    for i in range(config.num_layers):
        pre = f"layers.{i}."
        is_lora = method == "lora" and i in adapted
        is_diff = method == "difflora" and i in adapted
        targets = set(adapter.targets) if is_lora else set()

        xn = rms_norm(x, p[pre + "input_norm.scale"], eps)
        at = pre + "attn."
        query = np.tensordot(xn, p[at + "q_proj.kernel"], axes=1)  # X W_Q
        key = np.tensordot(xn, p[at + "k_proj.kernel"], axes=1)
        value = linear(at + "v_proj", xn, adapters="v" in targets or (is_diff and adapter.lora_v))
        if not is_diff:
            if "q" in targets:
                query = query + lora(at + "q_proj.lora", xn)
            if "k" in targets:
                key = key + lora(at + "k_proj.lora", xn)
            probs = attention_map(rope(query, positions, theta), rope(key, positions, theta), mask)
            if maps is not None:
                maps.append((probs, None))
            out = apply_map(probs, value)
            attn_out = linear(at + "o_proj", out, n_in=2, adapters="o" in targets)
        else:
            q1, k1 = query, key
            if adapter.positive_term:
                q1 = q1 + lora(at + "q_proj.lora", xn)
                k1 = k1 + lora(at + "k_proj.lora", xn)
            if adapter.negative_term == "full":
                q2 = np.tensordot(xn, p[at + "negative_q.kernel"], axes=1)
                k2 = np.tensordot(xn, p[at + "negative_k.kernel"], axes=1)
            else:
                q2 = lora(at + "negative_q", xn)
                k2 = lora(at + "negative_k", xn)
                if adapter.negative_term == "base_plus_adapters":
                    q2, k2 = query + q2, key + k2
            positive = attention_map(rope(q1, positions, theta), rope(k1, positions, theta), mask)
            negative = attention_map(rope(q2, positions, theta), rope(k2, positions, theta), mask)
            lambda_init = reference_lambda_init(adapter, i)
            if adapter.lambda_mode == "learned":
                lam = (
                    math.exp(np.sum(p[at + "lambda_q1"] * p[at + "lambda_k1"]))
                    - math.exp(np.sum(p[at + "lambda_q2"] * p[at + "lambda_k2"]))
                    + lambda_init
                )
            else:
                lam = lambda_init
            if maps is not None:
                maps.append((positive, lam * negative))
            diff = positive - lam * negative
            if adapter.relu_on_differential:
                diff = np.maximum(diff, 0.0)
            out = apply_map(diff, value)  # [b, t, heads, head_dim]
            if adapter.group_norm:
                out = out / np.sqrt(np.mean(out * out, axis=-1, keepdims=True) + GROUP_NORM_EPS)
                out = out * p[at + "group_norm"] * (1.0 - lambda_init)
            attn_out = linear(at + "o_proj", out, n_in=2)
            if adapter.lora_o:  # parallel output branch reading the attention block's input
                attn_out = attn_out + lora(at + "output_branch", xn)
        x = x + attn_out

        mlp_adapters = {t for t in ("gate", "up", "down") if t in targets}
        if is_diff and adapter.lora_mlp:
            mlp_adapters = {"gate", "up", "down"}
        xn = rms_norm(x, p[pre + "mlp_norm.scale"], eps)
        mp = pre + "mlp."
        gate = linear(mp + "gate_proj", xn, adapters="gate" in mlp_adapters)
        up = linear(mp + "up_proj", xn, adapters="up" in mlp_adapters)
        x = x + linear(mp + "down_proj", silu(gate) * up, adapters="down" in mlp_adapters)

    x = rms_norm(x, p["final_norm.scale"], eps)
    if config.tie_word_embeddings:
        return x @ p["embed_tokens.embedding"].T
    return np.tensordot(x, p["lm_head.kernel"], axes=1)
