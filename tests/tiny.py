"""The tiny models of the tests, in one place: their configurations, a random tiny Llama (in
memory, or written as a Hugging Face directory with a byte-level ChatML tokenizer), and random
batches in the data pipeline's format.

``TINY`` is the shape of the tiny Hugging Face checkpoints that ``tests/conftest.py`` writes
(its ``TINY_CONFIG`` is derived from it). A test that needs another shape states only what
differs, as ``tiny_config(**overrides)``, and says why.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.modeling.adapters import apply_adapters
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.weights.hf_config import hf_llama_config
from difflora_jax.weights.layout import hf_layout
from difflora_jax.weights.safetensors_io import write_safetensors

TINY = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,  # grouped-query attention, two query heads per key/value head
    head_dim=16,  # heads * head_dim == hidden_size, as the reference DiffLoRA format requires
    # Not transformers' default (1e-6) nor our fallback, so a dropped eps would show.
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=64,
)


def tiny_config(**overrides) -> ModelConfig:
    """``TINY`` with ``overrides`` (any ``ModelConfig`` field)."""
    return dataclasses.replace(TINY, **overrides)


# The training tests' model: the 256 byte tokens and 3 ChatML specials of their byte-level
# tokenizer fit the vocabulary (a multiple of 8, as real vocabularies are), <|im_end|> (258) is
# the end of turn, 512 positions hold their packed rows; half TINY's width (the shape their
# checks were written against).
BYTE_TINY = tiny_config(
    vocab_size=264,
    hidden_size=32,
    intermediate_size=48,
    head_dim=8,
    max_position_embeddings=512,
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
    adapter: AdapterConfig | None = DIFFLORA,
    *,
    dtype=jnp.float32,
    seed: int = 0,
    config=BYTE_TINY,
) -> LlamaForCausalLM:
    """A random tiny Llama, with ``adapter`` applied (None: the bare base model)."""
    model = LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))
    return model if adapter is None else apply_adapters(model, adapter)


def random_batch(batch: int, length: int, *, vocab: int = BYTE_TINY.vocab_size, seed: int = 0):
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
    directory.mkdir(parents=True, exist_ok=True)
    layout = hf_layout(model.config)
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        entry = layout[".".join(str(p) for p in path)]
        tensors[entry.hf_name] = entry.to_hf(np.asarray(variable[...], np.float32))
    write_safetensors(directory / "model.safetensors", tensors)
    config = hf_llama_config(model.config)
    (directory / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
