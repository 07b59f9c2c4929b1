"""KV-cache decoding against full recomputation, sampling controls, and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import difflora_jax.generation as generation
from difflora_jax.errors import ConfigError
from difflora_jax.generation import cache_length, generate_ids
from difflora_jax.modeling.llama import LlamaForCausalLM
from tests.tiny import tiny_config

# A vocabulary that is not a multiple of 8; 256 positions, the limit a too-long request hits.
CONFIG = tiny_config(vocab_size=97, max_position_embeddings=256)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(3))


def _left_pad(prompts, length):
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        ids[row, length - len(p) :] = p
        mask[row, length - len(p) :] = 1
    return ids, mask


def test_cached_decoding_equals_full_recomputation_every_step(model):
    """Prefill a left-padded batch, then feed tokens one by one through the cache; at every
    step the last-position logits equal a full forward pass over each row's whole sequence."""
    steps, width = 6, 8
    ids, mask = _left_pad(PROMPTS, width)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cache = model.init_cache(len(PROMPTS), width + steps)
    forward = nnx.jit(
        lambda m, ids, mask, pos, cache: m.forward(ids, mask, positions=pos, cache=cache)
    )
    logits, cache = forward(model, ids, mask, positions, cache)
    sequences = [list(p) for p in PROMPTS]
    next_pos = positions[:, -1] + 1
    full = nnx.jit(lambda m, ids: m(ids))
    for _ in range(steps):
        last = np.asarray(logits[:, -1])
        for row, seq in enumerate(sequences):
            reference = np.asarray(full(model, jnp.asarray([seq]))[0, -1])
            np.testing.assert_allclose(last[row], reference, atol=2e-5, rtol=0)
        token = last.argmax(-1).astype(np.int32)
        for row, seq in enumerate(sequences):
            seq.append(int(token[row]))
        logits, cache = forward(
            model, token[:, None], np.ones((len(PROMPTS), 1), np.int32), next_pos[:, None], cache
        )
        next_pos = next_pos + 1


def test_greedy_generate_matches_argmax_of_full_recomputation(model):
    out = generate_ids(model, PROMPTS, max_new_tokens=10, chunk_size=4)
    full = nnx.jit(lambda m, ids: m(ids))
    for prompt, (tokens, reason) in zip(PROMPTS, out):
        assert reason == "length" and len(tokens) == 10
        seq = list(prompt)
        for token in tokens:
            assert token == int(np.asarray(full(model, jnp.asarray([seq]))[0, -1]).argmax())
            seq.append(token)


def test_eos_ends_a_row_and_is_kept(model):
    (first, _), *_ = generate_ids(model, [PROMPTS[0]], max_new_tokens=8)
    eos = first[2]
    out = generate_ids(model, [PROMPTS[0]], max_new_tokens=8, eos_token_ids=[eos])
    tokens, reason = out[0]
    assert reason == "eos"
    assert tokens == first[: first.index(eos) + 1]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model):
    kwargs = dict(max_new_tokens=12, temperature=1.0)
    a = generate_ids(model, PROMPTS, seed=7, **kwargs)
    b = generate_ids(model, PROMPTS, seed=7, **kwargs)
    c = generate_ids(model, PROMPTS, seed=8, **kwargs)
    assert a == b
    assert a != c
    greedy = generate_ids(model, PROMPTS, max_new_tokens=12)
    nucleus = generate_ids(model, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3)
    assert nucleus == greedy


def test_should_stop_ends_rows_early(model):
    out = generate_ids(
        model, PROMPTS, max_new_tokens=40, chunk_size=4, should_stop=lambda row, ids: len(ids) >= 4
    )
    for tokens, reason in out:
        assert reason == "stop"
        assert 4 <= len(tokens) < 40


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 1000}, "max_position_embeddings"),
    ],
)
def test_bad_generation_arguments(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate_ids(model, PROMPTS, **kwargs)


def test_empty_prompt_is_refused(model):
    with pytest.raises(ConfigError, match="at least one token"):
        generate_ids(model, [[]], max_new_tokens=2)


@pytest.mark.parametrize("method", ["lora-r8", "difflora-32"])
def test_generation_with_dropout_adapters_equals_dropout_free_copy(model, method):
    """Fresh adapters with dropout (as a method YAML sets them) generate: dropout is off, and
    the RNG streams are left alone, so the tokens equal those of the same adapters with dropout
    0 (a regression: the decode scan once tried to write unchanged RNG streams back)."""
    import dataclasses

    from difflora_jax.catalog import load_method
    from difflora_jax.modeling.adapters import adapter_arrays, apply_adapters, write_back

    adapter = load_method(method)
    assert adapter.dropout > 0
    with_dropout = apply_adapters(nnx.clone(model), adapter)
    without = apply_adapters(nnx.clone(model), dataclasses.replace(adapter, dropout=0.0))
    write_back(without, adapter_arrays(with_dropout))
    got = generate_ids(with_dropout, PROMPTS, max_new_tokens=5)
    assert got == generate_ids(without, PROMPTS, max_new_tokens=5)
    assert all(len(tokens) == 5 for tokens, _ in got)


def test_generation_leaves_the_callers_layer_execution_alone(model):
    """Generation runs a view with the layers unrolled; the caller's model keeps its scan."""
    runs = model.layer_runs()
    assert model.scan_layers and len(runs) == 1
    generate_ids(model, PROMPTS[:1], max_new_tokens=2)
    assert model.scan_layers and model.layer_runs() == runs


@pytest.mark.parametrize(
    ("needed", "limit", "length"),
    [
        (1, None, 1),
        (28, None, 32),
        (112, None, 128),
        (128, None, 128),
        (144, None, 256),
        (1000, None, 1024),
        (1025, None, 2048),
        (2049, None, 3072),
        (100, 120, 120),  # not past the model's positions...
        (300, 256, 300),  # ...unless the tokens need it
    ],
)
def test_cache_length_buckets(needed, limit, length):
    assert cache_length(needed, limit) == length


def _compiles(run) -> list[str]:
    """The names of the jitted functions that ``run()`` compiles (from JAX's compile log)."""
    import logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, logger = Collect(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            run()
    finally:
        logger.removeHandler(handler)
    done = "Finished XLA compilation of jit("
    return [m[len(done) :].split(")")[0] for m in messages if m.startswith(done)]


def test_prompts_of_other_lengths_share_the_compiled_decoding_step(model):
    """Prompt buckets 32 and 48 with 16 new tokens need caches of 48 and 64 slots: both get 64,
    so the second prompt compiles a prefill for its length but no decoding step."""

    def run(length: int):
        return lambda: generate_ids(
            model, [list(range(1, length + 1))], max_new_tokens=16, chunk_size=16
        )

    run(20)()
    compiled = _compiles(run(40))
    assert "prefill" in compiled and "_decode_chunk" not in compiled


def test_a_bucketed_cache_generates_what_an_exactly_sized_one_does(model, monkeypatch):
    """20 new tokens in chunks of 16 after 16-token prompts: 48 slots needed, 64 allocated."""
    assert cache_length(48, CONFIG.max_position_embeddings) == 64
    bucketed = generate_ids(model, PROMPTS, max_new_tokens=20, chunk_size=16)
    monkeypatch.setattr(generation, "cache_length", lambda needed, limit=None: needed)
    exact = generate_ids(model, PROMPTS, max_new_tokens=20, chunk_size=16)
    assert bucketed == exact


def test_weights_on_a_mesh_compile_the_decoding_step_once_per_shape():
    """Weights placed on a (one-device) mesh: the carry of prefill and of every decoding chunk
    keeps one sharding, so the chunks after the first reuse its compiled step."""
    from difflora_jax.parallel import make_mesh, make_rules
    from difflora_jax.parallel.mesh import MeshConfig
    from difflora_jax.parallel.shard import shard_model

    sharded = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(3))
    shard_model(sharded, make_mesh(MeshConfig()), make_rules())
    plain = generate_ids(LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(3)), PROMPTS, max_new_tokens=24)
    out: list = []
    compiled = _compiles(lambda: out.extend(generate_ids(sharded, PROMPTS, max_new_tokens=24)))
    assert compiled.count("prefill") == 1 and compiled.count("_decode_chunk") == 1
    assert out == plain
