"""Shared fixtures: tiny random Llama checkpoints written by transformers, and reference logits.

PyTorch and transformers are test-only peers: the library never imports torch. Every tiny
checkpoint is a real ``transformers.LlamaForCausalLM`` saved with ``save_pretrained`` (always
safetensors in transformers 5), so the loaders see exactly what a user's directory holds.
torch and transformers are imported inside the helpers that use them, so the tests that never
touch a torch model (data, config, ...) run without PyTorch installed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pytest
from flax import nnx

from tests.tiny import TINY, byte_tokenizer, tiny_model, write_hf_checkpoint

if TYPE_CHECKING:
    import torch

# The suite compiles hundreds of small programs and runs few steps of each: the one malloc arena
# of ``host_memory`` (what the ``difflora`` command sets) costs it more compile time than the
# page faults it saves. Off here and in the commands the tests start as subprocesses;
# tests/test_host_memory.py sets it per interpreter.
os.environ.setdefault("DIFFLORA_JAX_KEEP_FREED_MEMORY", "0")

# ``transformers.LlamaConfig`` arguments of the tiny checkpoints: the shape of tests/tiny.py's TINY.
TINY_CONFIG = dict(
    vocab_size=TINY.vocab_size,
    hidden_size=TINY.hidden_size,
    intermediate_size=TINY.intermediate_size,
    num_hidden_layers=TINY.num_layers,
    num_attention_heads=TINY.num_heads,
    num_key_value_heads=TINY.num_kv_heads,
    head_dim=TINY.head_dim,
    max_position_embeddings=TINY.max_position_embeddings,
    rms_norm_eps=TINY.rms_norm_eps,
    tie_word_embeddings=TINY.tie_word_embeddings,
    bos_token_id=1,
    eos_token_id=2,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 10000.0,
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every weight with O(1) activations, and norms far from all-ones.

    transformers' default init (normal(0, 0.02), norms = 1) gives near-uniform logits, where a
    parity tolerance says little, and all-ones norms let a bug in the norm mapping hide.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # RMSNorm scales
                noise = torch.randn(param.shape, generator=gen)
                param.copy_(1.0 + 0.3 * noise)
            elif "embed_tokens" in name:
                # Also the tied LM head: std 0.25 keeps tied logits O(1) as untied ones.
                param.copy_(0.25 * torch.randn(param.shape, generator=gen))
            else:  # nn.Linear [out, in]: unit-variance outputs
                param.copy_(torch.randn(param.shape, generator=gen) * param.shape[1] ** -0.5)


def save_tiny_llama(
    tmp_path, *, name="tiny", seed=0, max_shard_size=None, save_dtype=None, **config_overrides
):
    """Write a random tiny Llama with ``save_pretrained`` under ``tmp_path / name``.

    ``config_overrides`` go to ``transformers.LlamaConfig`` (e.g. ``num_key_value_heads``,
    ``tie_word_embeddings``, ``rope_parameters``). ``max_shard_size`` writes a sharded checkpoint
    with an index file; ``save_dtype`` (a torch dtype) saves the weights in that dtype; the
    returned model then holds those rounded weights, back in float32. Returns ``(directory, torch_model)``, the model float32 in eval
    mode with eager attention (the plain reference implementation).
    """
    import torch
    import transformers

    config = transformers.LlamaConfig(**{**TINY_CONFIG, **config_overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    randomize_(model, seed)
    directory = tmp_path / name
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if save_dtype is not None:
        # Round the parameters in place rather than model.to(save_dtype), which would also
        # round the RoPE inv_freq buffer of the float32 reference.
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(save_dtype).to(torch.float32))
        state = {k: v.to(save_dtype) for k, v in model.state_dict().items()}
        kwargs["state_dict"] = state
    model.save_pretrained(directory, **kwargs)
    return directory, model


def torch_logits(model, input_ids, attention_mask=None, position_ids=None):
    """Reference float32 logits; positions default to what difflora_jax uses by default
    (the count of real tokens before each one, so left padding does not shift RoPE)."""
    import torch

    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if position_ids is None:
        position_ids = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(np.asarray(position_ids), dtype=torch.long),
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """``tiny_llama(**overrides) -> (directory, torch_model)``, cached for the whole session.

    Callers must not modify the directory; copy it first (``shutil.copytree``).
    """
    cache = {}

    def get(**overrides):
        key = repr(sorted(overrides.items()))
        if key not in cache:
            cache[key] = save_tiny_llama(tmp_path_factory.mktemp("tiny"), **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def forward():
    """A jitted ``forward(model, input_ids, attention_mask) -> float32 logits`` (numpy)."""
    jitted = nnx.jit(lambda m, ids, mask: m(ids, mask))

    def run(model, input_ids, attention_mask=None):
        ids = np.asarray(input_ids, dtype=np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        return np.asarray(jitted(model, ids, mask))

    return run


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """``tests.tiny``'s random Llama as a HF directory with the byte-level ChatML tokenizer (read-only)."""
    directory = tmp_path_factory.mktemp("tiny_hf") / "tiny-llama"
    write_hf_checkpoint(directory, tiny_model(None, seed=1), tokenizer=byte_tokenizer())
    return directory


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template), built from the GGUF metadata
    alone (no weights are read)."""
    from difflora_jax.weights.gguf_io import open_gguf
    from difflora_jax.weights.loading import resolve_source
    from difflora_jax.weights.tokenizer import tokenizer_from_gguf

    path = resolve_source("smollm2-135m-instruct")
    return tokenizer_from_gguf(open_gguf(path), path)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (dequantized GGUF, float32) and its tokenizer."""
    from difflora_jax.weights.loading import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module", autouse=True)
def _release_compilations():
    """After each test module, drop JAX's compiled executables and traces (and the arrays their
    caches keep alive). One pytest process runs the whole suite; without this it accumulated
    every module's compilations (over 6 GB resident by the reproduce tests) and XLA's CPU
    compiler once crashed (SIGSEGV) compiling in that state. Modules share no compilations
    worth keeping: each builds its own models."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
