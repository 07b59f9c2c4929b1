"""Logits parity with transformers' PyTorch LlamaForCausalLM on tiny random checkpoints.

Each checkpoint is written by ``save_pretrained`` and read back with ``difflora_jax.load_model``,
so these tests cover the config mapping, the weight layout and the model together.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import difflora_jax
from difflora_jax.weights.hf_config import model_config_from_hf
from tests.conftest import LLAMA3_ROPE, save_tiny_llama, torch_logits

ATOL = 1e-4  # float32 end to end; observed differences are ~2e-6 on O(1) logits
BATCH, LENGTH = 3, 40  # longer than the original context (16 or 32) of the llama3 RoPE cases
LENGTHS = (40, 27, 9)  # real tokens per row when padded

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    # original context 16: the highest frequency is smoothed, all others divided by factor.
    "llama3": LLAMA3_ROPE,
    # original context 32: one frequency unchanged, one smoothed, the rest divided (all 3 bands).
    "llama3-3band": {**LLAMA3_ROPE, "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
}
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}  # num_key_value_heads for 4 query heads

MODEL_CASES = [
    pytest.param(kv, tie, rope, id=f"{kv}-{'tied' if tie else 'untied'}-{rope}")
    for kv in ("mha", "gqa")
    for tie in (True, False)
    for rope in ("default", "llama3", "linear")
] + [
    pytest.param("gqa", False, "llama3-3band", id="gqa-untied-llama3-3band"),
    pytest.param("mqa", True, "default", id="mqa-tied-default"),
]


def _overrides(kv, tie, rope):
    return dict(
        num_key_value_heads=HEADS[kv],
        tie_word_embeddings=tie,
        rope_parameters=dict(ROPES[rope]),
    )


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    """``loaded(kv, tie, rope) -> (torch_model, our_model)``, each loaded once per module."""
    cache = {}

    def get(kv, tie, rope):
        key = (kv, tie, rope)
        if key not in cache:
            directory, torch_model = tiny_llama(**_overrides(kv, tie, rope))
            model, tokenizer = difflora_jax.load_model(directory, dtype="float32")
            assert tokenizer is None  # the tiny directories hold no tokenizer files
            cache[key] = torch_model, model
        return cache[key]

    return get


def _batch(padding, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 128, size=(BATCH, LENGTH)).astype(np.int32)
    mask = np.zeros((BATCH, LENGTH), np.int32)
    for row, n in enumerate(LENGTHS):
        if padding == "none":
            mask[row] = 1
        elif padding == "right":
            mask[row, :n] = 1
        else:
            mask[row, LENGTH - n :] = 1
    ids = np.where(mask == 1, ids, 0)  # pad id 0, as a tokenizer would write
    return ids, mask


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize(("kv", "tie", "rope"), MODEL_CASES)
def test_logits_match_transformers(loaded, forward, kv, tie, rope, padding):
    torch_model, model = loaded(kv, tie, rope)
    assert model.config.num_kv_heads == HEADS[kv]
    assert model.config.tie_word_embeddings is tie
    assert hasattr(model, "lm_head") is not tie
    ids, mask = _batch(padding)

    ours = forward(model, ids, mask)
    ref = torch_logits(torch_model, ids, mask)

    assert ours.shape == (BATCH, LENGTH, 128)
    assert ours.dtype == np.float32
    # Padding rows (left padding: queries with no valid key) must stay finite.
    assert np.all(np.isfinite(ours))
    real = mask.astype(bool)
    diff = np.abs(ours[real] - ref[real]).max()
    assert diff <= ATOL, f"max |ours - torch| = {diff:.3g} at real tokens"


def test_padding_does_not_change_real_token_logits(loaded, forward):
    """Each padded row equals that sequence run alone, left or right padded."""
    _, model = loaded("gqa", False, "llama3")
    for padding in ("right", "left"):
        padded_ids, mask = _batch(padding)
        padded = forward(model, padded_ids, mask)
        for row, n in enumerate(LENGTHS):
            real = mask[row].astype(bool)
            assert real.sum() == n
            alone = forward(model, padded_ids[row : row + 1, real])[0]
            np.testing.assert_allclose(padded[row, real], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope", ["llama3", "llama3-3band", "linear"])
def test_rope_scaling_cases_are_not_vacuous(tiny_llama, rope):
    """The scaled-RoPE checkpoints really differ from default RoPE at these lengths, so the
    parity cases above would catch scaling that is dropped or applied wrongly."""
    _, scaled = tiny_llama(**_overrides("gqa", False, rope))
    _, plain = tiny_llama(**_overrides("gqa", False, "default"))
    ids, _ = _batch("none")
    diff = np.abs(torch_logits(scaled, ids) - torch_logits(plain, ids)).max()
    assert diff > 100 * ATOL


def test_config_read_from_checkpoint(loaded):
    _, model = loaded("gqa", False, "llama3")
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (128, 64, 96)
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (2, 4, 2)
    assert config.head_dim == 16
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.rope_theta == 10000.0
    scaling = config.rope_scaling
    assert scaling is not None and scaling.rope_type == "llama3"
    assert scaling.factor == 8.0
    assert scaling.original_max_position_embeddings == 16
    assert (scaling.low_freq_factor, scaling.high_freq_factor) == (1.0, 4.0)
    assert loaded("gqa", False, "default")[1].config.rope_scaling is None
    linear = loaded("gqa", False, "linear")[1].config.rope_scaling
    assert linear.rope_type == "linear" and linear.factor == 2.0


# ---------------------------------------------------------------------------------------------
# bfloat16


def test_bfloat16_loading_stays_close_to_float32(tiny_llama, forward):
    directory, _ = tiny_llama(**_overrides("gqa", False, "llama3"))
    f32, _ = difflora_jax.load_model(directory, dtype="float32")
    bf16, _ = difflora_jax.load_model(directory, dtype="bfloat16")
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}

    ids, mask = _batch("left")
    ref = forward(f32, ids, mask)
    low = forward(bf16, ids, mask)
    assert low.dtype == np.float32  # logits are float32 whatever the parameter dtype
    assert np.all(np.isfinite(low))
    real = mask.astype(bool)
    diff = np.abs(low[real] - ref[real])
    scale = np.abs(ref[real]).max()
    # bfloat16 keeps 8 significant bits: every weight and activation rounding costs up to
    # 2**-9 ~ 0.2% relative, and two layers of matmuls, norms and residuals compound a few of
    # them, so ~1-2% of the logit range is expected (observed ~1.3%). 5% still fails any real
    # mapping bug (a wrong norm, transposed kernel or RoPE gives differences of order the range).
    assert diff.max() <= 0.05 * scale, f"max diff {diff.max():.3g}, logit range {scale:.3g}"
    assert diff.mean() <= 0.01 * scale
    agree = (low.argmax(-1) == ref.argmax(-1))[real].mean()
    assert agree >= 0.9


def test_bfloat16_checkpoint_loads(tmp_path, forward):
    """A checkpoint saved in bfloat16 (as most released Llama weights are) loads as float32."""
    directory, torch_model = save_tiny_llama(tmp_path, save_dtype=torch.bfloat16)
    model, _ = difflora_jax.load_model(directory, dtype="float32")
    ids, mask = _batch("right")
    ours = forward(model, ids, mask)
    ref = torch_logits(torch_model, ids, mask)  # the same bfloat16-rounded weights, in float32
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= ATOL


# ---------------------------------------------------------------------------------------------
# packed sequences


def test_packed_sequences_match_each_alone(loaded, forward):
    torch_model, model = loaded("gqa", False, "llama3")
    rng = np.random.default_rng(1)
    length = 32
    # row 0: segments of 11 and 17 tokens, then 4 padding; row 1: segments of 20, 5 and 7.
    layouts = [(11, 17), (20, 5, 7)]
    ids = rng.integers(3, 128, size=(2, length)).astype(np.int32)
    segment_ids = np.zeros((2, length), np.int32)
    positions = np.zeros((2, length), np.int32)
    for row, sizes in enumerate(layouts):
        start = 0
        for seg, size in enumerate(sizes, start=1):
            segment_ids[row, start : start + size] = seg
            positions[row, start : start + size] = np.arange(size)
            start += size
    mask = (segment_ids > 0).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)

    packed_fn = nnx.jit(lambda m, i, a, p, s: m(i, a, positions=p, segment_ids=s))
    packed = np.asarray(packed_fn(model, ids, mask, positions, segment_ids))
    assert np.all(np.isfinite(packed))

    for row, sizes in enumerate(layouts):
        start = 0
        for size in sizes:
            seq = ids[row : row + 1, start : start + size]
            alone = forward(model, seq)[0]
            ref = torch_logits(torch_model, seq)[0]
            got = packed[row, start : start + size]
            np.testing.assert_allclose(got, alone, atol=ATOL, rtol=0)
            np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
            start += size

    # Negative control: without segment ids the second segment attends to the first.
    unsegmented = np.asarray(
        nnx.jit(lambda m, i, a, p: m(i, a, positions=p))(model, ids, mask, positions)
    )
    second = slice(11, 28)
    assert np.abs(unsegmented[0, second] - packed[0, second]).max() > 100 * ATOL


def test_num_params_matches_torch(tiny_llama):
    """ModelConfig.num_params (read from the checkpoint's config) counts what PyTorch holds."""
    for tied in (True, False):
        _, model = tiny_llama(tie_word_embeddings=tied)
        config = model_config_from_hf(model.config.to_dict())
        # parameters() yields a tied weight once, as num_params counts it
        assert config.num_params == sum(p.numel() for p in model.parameters())
