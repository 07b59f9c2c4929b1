import pytest
from flax import nnx

from difflora_jax.config import ModelConfig
from difflora_jax.data import make_mix
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.weights.gguf_io import open_gguf
from difflora_jax.weights.loading import resolve_source
from difflora_jax.weights.tokenizer import tokenizer_from_gguf


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    """The real SmolLM2 tokenizer with a tiny random model over its vocabulary."""
    path = resolve_source("smollm2-135m-instruct")
    tokenizer = tokenizer_from_gguf(open_gguf(path), path)
    config = ModelConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_ids=(2,),
    )
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    items = make_mix(6, seed=1, split="eval")
    return model, tokenizer, items
