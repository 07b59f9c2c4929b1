import pytest
from flax import nnx

from difflora_jax.data import make_mix
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.weights.gguf_io import open_gguf
from difflora_jax.weights.loading import resolve_source
from difflora_jax.weights.tokenizer import tokenizer_from_gguf
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    """The real SmolLM2 tokenizer with a tiny random model over its vocabulary."""
    path = resolve_source("smollm2-135m-instruct")
    tokenizer = tokenizer_from_gguf(open_gguf(path), path)
    # SmolLM2's vocabulary, tied embeddings and end of turn (<|im_end|> = 2); room for the
    # 128-token held-out items plus the generated answer.
    config = tiny_config(
        vocab_size=49152,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_ids=(2,),
    )
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    items = make_mix(6, seed=1, split="eval")
    return model, tokenizer, items
