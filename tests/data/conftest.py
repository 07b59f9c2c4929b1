"""Fixtures for the data pipeline tests: the real SmolLM2-135M-Instruct tokenizer (ChatML
template), built from the GGUF metadata alone (no weights are read)."""

from __future__ import annotations

import pytest

from difflora_jax.weights.gguf_io import open_gguf
from difflora_jax.weights.loading import resolve_source
from difflora_jax.weights.tokenizer import tokenizer_from_gguf


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    path = resolve_source("smollm2-135m-instruct")
    return tokenizer_from_gguf(open_gguf(path), path)
