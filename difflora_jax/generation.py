"""Text generation: jitted prefill, then decode over a preallocated KV cache.

Prompts are left-padded to one length (rounded up to a bucket so that repeated calls reuse the
compiled functions), and the KV cache is sized in coarser buckets (``cache_length``), so that
calls whose prompts or token budgets differ a little share the compiled decoding step.
Decoding runs ``chunk_size`` steps per jitted call inside ``lax.scan``; between chunks the host
checks EOS and stop strings, so a finished batch stops early. Both run the decoder layers
unrolled, each on its own weights, with one KV-cache array per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from difflora_jax.errors import ConfigError
from difflora_jax.jit import jit_donating
from difflora_jax.modeling.attention import KVCache
from difflora_jax.modeling.llama import LlamaForCausalLM, default_positions
from difflora_jax.parallel import DEFAULT_RULES, Rules, use_mesh
from difflora_jax.parallel.shard import batch_sharding, batch_split
from difflora_jax.protocols import Tokenizer

PROMPT_BUCKET = 16
CACHE_BUCKET_LINEAR = 1024  # cache lengths above this round up to a multiple of it


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's output: decoded text, generated token ids, and why it stopped."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cache_length(needed: int, limit: int | None = None) -> int:
    """The KV-cache length generation allocates for ``needed`` slots: the next power of two, or
    above ``CACHE_BUCKET_LINEAR`` the next multiple of it, but not past ``max(needed, limit)``
    (``limit``: the model's ``max_position_embeddings``).

    The decoding step compiles once per batch size and cache length, so buckets let calls
    whose prompt lengths or token budgets differ (one cache length each when sized exactly)
    share it. Slots past the tokens are masked; they cost a decoding step one read of their
    zeros."""
    if needed < 1:
        raise ValueError(f"a cache needs at least one slot, got {needed}")
    if needed <= CACHE_BUCKET_LINEAR:
        bucket = 1 << (needed - 1).bit_length()
    else:
        bucket = _round_up(needed, CACHE_BUCKET_LINEAR)
    return bucket if limit is None else min(bucket, max(needed, limit))


def _select(logits: jax.Array, key: jax.Array, temperature, top_p, greedy: bool, nucleus: bool):
    """Next token ``[batch]`` from last-position logits ``[batch, vocab]``."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if nucleus:
        probs = jax.nn.softmax(scaled, axis=-1)
        sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]
        kept = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p  # first always kept
        cutoff = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(probs >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def left_pad(
    prompts: Sequence[Sequence[int]], length: int, pad_token_id: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask, positions)``, int32 ``[len(prompts), length]``: each prompt
    right-aligned after ``pad_token_id`` padding, positions counting real tokens only (so every
    prompt's first token is at position 0, as without padding)."""
    if max(len(p) for p in prompts) > length:
        raise ConfigError(f"a prompt of {max(len(p) for p in prompts)} tokens exceeds {length}")
    input_ids = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            input_ids[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = 1
    return input_ids, mask, np.asarray(default_positions(mask))


def generation_view(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The model as generation runs it: a view sharing its weights (the caller's model is
    unchanged) with adapter dropout off and the layers unrolled, each on its own weights, so
    that the KV cache holds one array per layer.

    A scan would first stack the weights (a fresh 0.4 GB per call for SmolLM2-135M, about
    0.3 s on a 2-core CPU) and copy each layer's slice of the stacked cache out before
    attention, and a one-token decoding step is bound by reading every weight once. Unrolled,
    the first call compiled no slower, and generation ran 16% (batch 1) and 5% (batch 4) faster
    (same-process A/B, 128-token prompts, 64 new tokens)."""
    view = nnx.view(model, only=nnx.Dropout, deterministic=True, raise_if_not_found=False)
    view.set_layer_execution(scan=False)
    return view


@dataclasses.dataclass(frozen=True)
class CarryShardings:
    """Where the state carried from one jitted generation call to the next lives: ``rows`` for
    arrays whose leading axis is the batch (split as the prompt rows are, the other axes
    whole), ``cache`` for the stacked KV arrays ``[layers, batch, ...]``, scalars replicated.

    Left to XLA, a call's outputs get whatever shardings propagation picks, which differ
    between prefill and a decoding chunk even on a one-device mesh; the next chunk then sees
    new input shardings and compiles again (every evaluation of the paper dry run compiled its
    decoding step twice). Both calls pin their outputs to these instead."""

    rows: NamedSharding
    cache: NamedSharding

    @classmethod
    def of(cls, state: Any, rows: NamedSharding | None) -> CarryShardings | None:
        """From the prompt rows' sharding, or else replicated over the mesh that holds the
        weights in ``state``; None when no weight is on a mesh (one device, JAX's placement)."""
        if rows is None:
            meshes = [
                x.sharding.mesh
                for x in jax.tree.leaves(state)
                if isinstance(getattr(x, "sharding", None), NamedSharding)
            ]
            if not meshes:
                return None
            rows = NamedSharding(meshes[0], PartitionSpec())
        lead = rows.spec[:1]  # the batch axis only: valid for rows of any rank >= 1
        return cls(
            NamedSharding(rows.mesh, PartitionSpec(*lead)),
            NamedSharding(rows.mesh, PartitionSpec(None, *lead)),
        )

    def scalar(self) -> NamedSharding:
        return NamedSharding(self.rows.mesh, PartitionSpec())

    def pin_cache(
        self,
        cache: KVCache,
        pin: Callable[[Any, NamedSharding], Any] = jax.lax.with_sharding_constraint,
    ) -> KVCache:
        """``cache`` on these shardings: constrained inside a jitted call, or placed outside
        one with ``pin=jax.device_put``."""
        return KVCache(
            keys=tuple(pin(k, self.cache) for k in cache.keys),
            values=tuple(pin(v, self.cache) for v in cache.values),
            key_valid=pin(cache.key_valid, self.rows),
            index=pin(cache.index, self.scalar()),
        )


@jit_donating(static_argnums=(0,), static_argnames=("carry",), donate_argnums=(5,))
def prefill(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    carry: CarryShardings | None = None,
) -> tuple[jax.Array, KVCache]:
    """Jitted prefill of ``nnx.split(model)``: last-position logits ``[batch, vocab]`` and the
    cache holding the prompt (donated off CPU). ``left_pad`` makes its inputs. ``carry``: the
    shardings its outputs are pinned to (as ``_decode_chunk`` pins its own)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.forward(
        input_ids, attention_mask, positions=positions, cache=cache, last_only=True
    )
    logits = logits[:, -1]
    if carry is not None:
        logits = jax.lax.with_sharding_constraint(logits, carry.rows)
        cache = carry.pin_cache(cache)
    return logits, cache


@jit_donating(
    static_argnums=(0,),
    static_argnames=("steps", "greedy", "nucleus", "carry"),
    donate_argnums=(2,),
)
def _decode_chunk(
    graphdef,
    state,
    cache,
    logits,
    positions,
    done,
    key,
    step0,
    temperature,
    top_p,
    eos_ids,
    pad_id,
    *,
    steps: int,
    greedy: bool,
    nucleus: bool,
    carry: CarryShardings | None = None,
):
    """``steps`` decode steps. Returns tokens ``[batch, steps]``, emitted flags, and the carry
    (pinned to ``carry``'s shardings)."""
    model = nnx.merge(graphdef, state)

    def step(loop, i):
        cache, logits, positions, done = loop
        token = _select(
            logits, jax.random.fold_in(key, step0 + i), temperature, top_p, greedy, nucleus
        )
        emitted = ~done
        token = jnp.where(done, pad_id, token)
        done = done | jnp.isin(token, eos_ids)
        ones = jnp.ones((token.shape[0], 1), jnp.int32)
        new_logits, cache = model.forward(
            token[:, None], ones, positions=positions[:, None], cache=cache
        )
        return (cache, new_logits[:, 0], positions + 1, done), (token, emitted)

    (cache, logits, positions, done), (tokens, emitted) = jax.lax.scan(
        step, (cache, logits, positions, done), jnp.arange(steps)
    )
    if carry is not None:
        cache = carry.pin_cache(cache)
        logits, positions, done = (
            jax.lax.with_sharding_constraint(x, carry.rows) for x in (logits, positions, done)
        )
    return tokens.T, emitted.T, cache, logits, positions, done


def _check_generation_args(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float
) -> None:
    """ConfigError for an empty prompt or an invalid ``max_new_tokens``, temperature or top_p."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt must hold at least one token")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} is invalid: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} is invalid: must be in (0, 1]")


def _append_emitted(
    outputs: list[list[int]],
    reasons: list[str],
    tokens: np.ndarray,
    emitted: np.ndarray,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
) -> None:
    """Append one chunk's emitted tokens ``[batch, steps]`` to each row's output (at most
    ``max_new_tokens``); a row that emits an EOS token gets the reason ``"eos"``."""
    for row in range(len(outputs)):
        for t in range(tokens.shape[1]):
            if emitted[row, t] and len(outputs[row]) < max_new_tokens:
                outputs[row].append(int(tokens[row, t]))
                if int(tokens[row, t]) in eos_token_ids:
                    reasons[row] = "eos"


def _stop_rows(
    should_stop: Callable[[int, list[int]], bool],
    outputs: list[list[int]],
    reasons: list[str],
    done: np.ndarray,
) -> list[int]:
    """The unfinished rows (not ``done``, no EOS yet) that ``should_stop`` ends now, each given
    the reason ``"stop"``."""
    stopped = [
        row
        for row in range(len(outputs))
        if not done[row] and reasons[row] == "length" and should_stop(row, outputs[row])
    ]
    for row in stopped:
        reasons[row] = "stop"
    return stopped


def generate_ids(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    chunk_size: int = 16,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> list[tuple[list[int], str]]:
    """Generate from token-id prompts; returns per prompt (new token ids, finish reason).

    Token ids include the EOS token that ended a sequence. ``should_stop(row, ids)`` is called
    between chunks for unfinished rows; returning True ends that row with reason ``"stop"``.
    ``mesh`` (with the model's weights placed on it, as ``load_model(mesh=...)`` does): the
    prompts and the KV cache are split by rows over the batch rule's mesh axes when the batch
    divides them (replicated otherwise), and the activations are constrained as in training.
    """
    if mesh is not None:
        rules = DEFAULT_RULES if rules is None else rules
        rows = batch_sharding(mesh, rules)
        if len(prompts) % batch_split(mesh, rules)[1] == 0:
            with use_mesh(mesh, rules):
                return _generate_ids(
                    model, prompts, max_new_tokens, temperature, top_p, seed, eos_token_ids,
                    pad_token_id, chunk_size, should_stop, rows,
                )  # fmt: skip
    return _generate_ids(
        model, prompts, max_new_tokens, temperature, top_p, seed, eos_token_ids, pad_token_id,
        chunk_size, should_stop, None,
    )  # fmt: skip


def _generate_ids(
    model, prompts, max_new_tokens, temperature, top_p, seed, eos_token_ids, pad_token_id,
    chunk_size, should_stop, rows: NamedSharding | None,
) -> list[tuple[list[int], str]]:  # fmt: skip
    """``generate_ids``; ``rows``: the sharding of the prompt rows (None: as JAX places them)."""
    _check_generation_args(prompts, max_new_tokens, temperature, top_p)
    batch = len(prompts)
    prompt_len = _round_up(max(len(p) for p in prompts), PROMPT_BUCKET)
    steps_total = _round_up(max_new_tokens, chunk_size)
    limit = model.config.max_position_embeddings
    if max(len(p) for p in prompts) + max_new_tokens > limit:
        raise ConfigError(
            f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's max_position_embeddings ({limit})"
        )
    input_ids, mask, positions = left_pad(prompts, prompt_len, pad_token_id)

    model = generation_view(model)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(batch, cache_length(prompt_len + steps_total, limit))
    ids_in, mask_in, positions_in = (jnp.asarray(a) for a in (input_ids, mask, positions))
    carry = CarryShardings.of(state, rows)
    if rows is not None and carry is not None:  # prompts and the cache split by rows
        ids_in, mask_in, positions_in = (
            jax.device_put(a, rows) for a in (ids_in, mask_in, positions_in)
        )
        cache = carry.pin_cache(cache, jax.device_put)

    def place(x: Any) -> jax.Array:  # as the jitted calls return their carry
        return jnp.asarray(x) if carry is None else jax.device_put(x, carry.rows)

    logits, cache = prefill(graphdef, state, ids_in, mask_in, positions_in, cache, carry=carry)
    next_positions = place(positions[:, -1] + 1)
    done = place(np.zeros((batch,), bool))
    key = jax.random.key(seed)
    eos = jnp.asarray(list(eos_token_ids) or [-1], jnp.int32)
    greedy = temperature == 0
    nucleus = (not greedy) and top_p < 1.0

    outputs: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    for step0 in range(0, max_new_tokens, chunk_size):
        tokens, emitted, cache, logits, next_positions, done = _decode_chunk(
            graphdef,
            state,
            cache,
            logits,
            next_positions,
            done,
            key,
            step0,
            jnp.float32(max(temperature, 1e-6)),
            jnp.float32(top_p),
            eos,
            pad_token_id,
            steps=chunk_size,
            greedy=greedy,
            nucleus=nucleus,
            carry=carry,
        )
        tokens, emitted, done_host = np.asarray(tokens), np.asarray(emitted), np.asarray(done)
        _append_emitted(outputs, reasons, tokens, emitted, max_new_tokens, eos_token_ids)
        if should_stop is not None:
            stopped = _stop_rows(should_stop, outputs, reasons, done_host)
            if stopped:
                done_host = done_host.copy()
                done_host[stopped] = True
                done = place(done_host)
        if done_host.all():
            break
    return list(zip(outputs, reasons))


def _prompt_token_ids(tokenizer: Tokenizer, prompt: Any, chat: bool) -> list[int]:
    if chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("chat=True, but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        raise ConfigError(
            f"prompt must be a string (or messages with chat=True), got {type(prompt).__name__}"
        )
    return list(tokenizer(prompt)["input_ids"])


def generate(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer | None,
    prompts: str | Sequence[Any],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    chat: bool = False,
    chunk_size: int = 16,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> list[Generation]:
    """Generate a continuation for each prompt (greedy when ``temperature == 0``).

    With ``chat=True`` each prompt (a string, or a list of ``{"role", "content"}`` messages) goes
    through the tokenizer's chat template. Generation of a prompt ends at an EOS token, at the
    first of ``stop`` strings (excluded from the text), or after ``max_new_tokens`` tokens.
    ``mesh`` / ``rules``: as in ``generate_ids`` (prompts and cache split by rows).
    """
    if tokenizer is None:
        raise ConfigError("generate needs a tokenizer; this checkpoint has none (use generate_ids)")
    if isinstance(prompts, str) or (chat and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    ids = [_prompt_token_ids(tokenizer, p, chat) for p in prompts]
    eos = list(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    stop = [s for s in stop if s]

    def decode(token_ids: list[int]) -> str:
        # one flat id list decodes to one string (HF declares str | list[str])
        return cast(str, tokenizer.decode(token_ids, skip_special_tokens=True))

    def should_stop(row: int, token_ids: list[int]) -> bool:
        text = decode(token_ids)
        return any(s in text for s in stop)

    results = generate_ids(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        eos_token_ids=eos,
        pad_token_id=pad,
        chunk_size=chunk_size,
        should_stop=should_stop if stop else None,
        mesh=mesh,
        rules=rules,
    )
    outputs = []
    for token_ids, reason in results:
        text = decode(token_ids)
        hits = [text.index(s) for s in stop if s in text]
        if hits:
            cut = min(hits)
            text = text[:cut]
            # keep the shortest token prefix whose text reaches the stop string
            n = next(k for k in range(1, len(token_ids) + 1) if len(decode(token_ids[:k])) > cut)
            token_ids, reason = token_ids[:n], "stop"
        outputs.append(Generation(text=text, token_ids=token_ids, finish_reason=reason))
    return outputs
