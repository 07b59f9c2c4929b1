"""GGUF loading on tiny files written here the way llama.cpp's converter writes them.

The tiny transformers checkpoints of ``conftest`` are exported with ``gguf.GGUFWriter``: the Q
and K projections permuted into llama.cpp's interleaved rotary layout, Llama-3 RoPE scaling as a
``rope_freqs.weight`` tensor of per-frequency divisors. Loading them back must give the logits of
the transformers model, which checks the metadata mapping, the un-permutation and the RoPE
factors without the 100 MB real model (``test_smollm2.py`` covers that one).
"""

import math

import gguf
import numpy as np
import pytest
import torch

import difflora_jax
from difflora_jax.errors import CheckpointError
from tests.conftest import LLAMA3_ROPE, torch_logits

ATOL = 1e-4

_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _permute(weight, heads):
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``: half-split -> interleaved rows."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _llama3_rope_factors(config):
    """llama.cpp convert_hf_to_gguf.py: the divisors of the default inverse frequencies."""
    rope = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def write_gguf(torch_model, path, *, tensors_only=None):
    """Export a transformers LlamaForCausalLM as a float32 GGUF (no tokenizer)."""
    config = torch_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_parameters["factor"])
    elif rope_type == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(config))
    for name, param in torch_model.state_dict().items():
        weight = param.detach().float().numpy().copy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            out = "output.weight"
        else:
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            out = f"blk.{layer}.{_LAYER[module]}.weight"
            if module == "self_attn.q_proj":
                weight = _permute(weight, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                weight = _permute(weight, config.num_key_value_heads)
        if tensors_only is None or out in tensors_only:
            writer.add_tensor(out, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("overrides", "rope"),
    [
        pytest.param(dict(num_key_value_heads=2, tie_word_embeddings=False), None, id="gqa"),
        pytest.param(dict(num_key_value_heads=4, tie_word_embeddings=True), None, id="mha-tied"),
        pytest.param(dict(num_key_value_heads=2), dict(LLAMA3_ROPE), id="gqa-llama3"),
        pytest.param(
            dict(num_key_value_heads=1),
            {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            id="mqa-linear",
        ),
    ],
)
def test_gguf_logits_match_transformers(tiny_llama, forward, tmp_path, overrides, rope):
    if rope is not None:
        overrides = {**overrides, "rope_parameters": rope}
    _, torch_model = tiny_llama(**overrides)
    path = write_gguf(torch_model, tmp_path / "tiny.gguf")
    model, tokenizer = difflora_jax.load_model(path, with_tokenizer=False)
    assert tokenizer is None
    config = model.config
    assert config.num_kv_heads == torch_model.config.num_key_value_heads
    assert config.tie_word_embeddings == torch_model.config.tie_word_embeddings
    assert config.rms_norm_eps == pytest.approx(1e-5)

    rng = np.random.default_rng(3)
    ids = rng.integers(3, 128, size=(2, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :15] = 0  # left padding
    ours = forward(model, ids, mask)
    ref = torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= ATOL


def test_gguf_without_tokenizer_metadata(tiny_llama, tmp_path):
    _, torch_model = tiny_llama()
    path = write_gguf(torch_model, tmp_path / "tiny.gguf")
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(path)  # with_tokenizer=True needs tokenizer.ggml.tokens
    assert str(path) in str(info.value) and "tokenizer" in str(info.value)


def test_gguf_missing_tensor(tiny_llama, tmp_path):
    _, torch_model = tiny_llama()
    keep = {"token_embd.weight", "output_norm.weight", "output.weight"}
    path = write_gguf(torch_model, tmp_path / "tiny.gguf", tensors_only=keep)
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(path, with_tokenizer=False)
    message = str(info.value)
    assert "lacks" in message and "model.layers.0." in message


def test_truncated_gguf(tiny_llama, tmp_path):
    _, torch_model = tiny_llama()
    path = write_gguf(torch_model, tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # header intact, tensor data cut
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(path, with_tokenizer=False)
    assert str(path) in str(info.value)
