"""Fixtures for the training tests: a tiny random Llama (in memory, or written as a Hugging Face
directory with a byte-level ChatML tokenizer), random batches in the data pipeline's format."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.modeling.adapters import apply_adapters
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.weights.layout import hf_layout

# 256 byte tokens + 3 specials fit; a multiple of 8 as real vocabularies are.
TINY = ModelConfig(
    vocab_size=264,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_ids=(258,),
    name="tiny",
)
DIFFLORA = AdapterConfig(method="difflora", rank=4, alpha=8.0, negative_term="adapters")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_model(
    adapter: AdapterConfig | None = DIFFLORA, *, dtype=jnp.float32, seed: int = 0, config=TINY
) -> LlamaForCausalLM:
    """A random tiny Llama, with ``adapter`` applied (None: the bare base model)."""
    model = LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))
    return model if adapter is None else apply_adapters(model, adapter)


def random_batch(batch: int, length: int, *, vocab: int = TINY.vocab_size, seed: int = 0):
    """A batch in the data pipeline's format: two packed segments per row and padding at the end
    of odd rows; loss on the second half of each segment."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    out = {
        "input_ids": ids[:, :length].copy(),
        "targets": ids[:, 1:].copy(),
        "loss_mask": np.zeros((batch, length), np.int32),
        "segment_ids": np.zeros((batch, length), np.int32),
        "positions": np.zeros((batch, length), np.int32),
    }
    for row in range(batch):
        used = length - (length // 4 if row % 2 else 0)
        cut = int(rng.integers(2, used - 2))
        for segment, (start, end) in enumerate([(0, cut), (cut, used)], start=1):
            out["segment_ids"][row, start:end] = segment
            out["positions"][row, start:end] = np.arange(end - start)
            mid = start + (end - start) // 2
            out["loss_mask"][row, mid : end - 1] = 1
        out["input_ids"][row, used:] = 0
        out["targets"][row, used:] = 0
    return out


def byte_tokenizer():
    """A byte-level BPE tokenizer (no merges: one token per byte) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def write_hf_checkpoint(directory, model: LlamaForCausalLM, *, tokenizer=None) -> None:
    """Write ``model``'s base weights as a Hugging Face Llama directory (safetensors)."""
    from safetensors.numpy import save_file

    config = model.config
    directory.mkdir(parents=True, exist_ok=True)
    layout = hf_layout(config)
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        entry = layout[".".join(str(p) for p in path)]
        tensors[entry.hf_name] = np.ascontiguousarray(
            entry.to_hf(np.asarray(variable[...], np.float32))
        )
    save_file(tensors, str(directory / "model.safetensors"))
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "eos_token_id": list(config.eos_token_ids),
        "hidden_act": "silu",
    }
    (directory / "config.json").write_text(json.dumps(hf))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Llama as a HF directory with the byte-level ChatML tokenizer (read-only)."""
    directory = tmp_path_factory.mktemp("tiny_hf") / "tiny-llama"
    write_hf_checkpoint(directory, tiny_model(None, seed=1), tokenizer=byte_tokenizer())
    return directory
