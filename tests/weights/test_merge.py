"""Merged export: LoRA adapters (and DiffLoRA's positive-term adapters, where the negative term
contributes nothing) fold into the base weights; the merged directory loads in transformers
and gives the adapted model's logits. A negative term that matters is refused clearly, pointing
to the reference format, with nothing written."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from difflora_jax.config import AdapterConfig
from difflora_jax.errors import CheckpointError
from difflora_jax.modeling.adapters import apply_adapters
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.weights.export import export_adapter
from difflora_jax.weights.loading import load_model
from difflora_jax.weights.merge import merged_params
from tests.conftest import torch_logits
from tests.tiny import tiny_config

from .conftest import ATOL, IDS, MASK, adapted_checkpoint, logits, max_diff, randomize_adapters


def _transformers_logits(directory):
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(directory), attn_implementation="eager"
    ).eval()
    assert next(model.parameters()).dtype.is_floating_point
    return torch_logits(model.float(), IDS, MASK)


def _no_leftovers(parent, name):
    return not (parent / name).exists() and not list(parent.glob(f".{name}.tmp-*"))


def test_merged_lora_loads_in_transformers_with_the_adapted_logits(trained_lora, tmp_path):
    _, torch_base, run_dir, model = trained_lora
    out = export_adapter(run_dir, tmp_path / "merged", "merged")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]

    ours = logits(model)
    theirs = _transformers_logits(out)
    assert max_diff(ours, torch_logits(torch_base, IDS, MASK)) > 100 * ATOL
    diff = max_diff(theirs, ours)
    assert diff <= ATOL, f"max |merged in transformers - adapted| = {diff:.3g}"
    # and our own loader reads it as a plain base model
    merged, _ = load_model(out, with_tokenizer=False)
    assert merged.adapter_config is None
    assert max_diff(logits(merged), ours) <= ATOL


def test_difflora_with_zero_lambda_folds_its_positive_term(tiny_llama, tmp_path):
    """Identity start with mirrored lambda vectors: lambda is exactly 0, so the positive-term,
    V and MLP adapters are all the layer does beyond a Llama layer."""
    directory, torch_base = tiny_llama(num_key_value_heads=4, tie_word_embeddings=True)
    adapter = AdapterConfig(
        method="difflora", rank=4, alpha=8.0, identity_start=True, lora_v=True, lora_mlp=True
    )
    model, checkpoint = adapted_checkpoint(
        directory, tmp_path / "ckpt", adapter, mirror_lambda=True
    )
    assert all(float(layer.attn.lambda_value()) == 0.0 for layer in model.layers)
    out = export_adapter(checkpoint, tmp_path / "merged", "merged")
    ours = logits(model)
    assert max_diff(ours, torch_logits(torch_base, IDS, MASK)) > 100 * ATOL
    diff = max_diff(_transformers_logits(out), ours)
    assert diff <= ATOL, f"max |merged in transformers - adapted| = {diff:.3g}"


def test_negative_term_is_refused_with_nothing_written(tiny_llama, tmp_path):
    directory, _ = tiny_llama()
    _, checkpoint = adapted_checkpoint(
        directory, tmp_path / "ckpt", AdapterConfig(method="difflora", rank=4, alpha=8.0)
    )
    with pytest.raises(
        CheckpointError, match=r"(?s)layer 0: lambda = .*negative term.*--format reference"
    ):
        export_adapter(checkpoint, tmp_path / "merged", "merged")
    assert _no_leftovers(tmp_path, "merged")


# Narrower than TINY: test_lora_folds_as_w_plus_s_a_b's rtol=1e-6 (a float32 fold against the
# float64 one) holds for this shape's random draws; at TINY's, a few near-zero sums differ by ~1e-5.
SMALL_MODEL = tiny_config(
    vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1, head_dim=8
)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(lambda_mode="fixed", lambda_init=0.0, group_norm=True), "group norm"),
        (dict(lambda_mode="fixed", lambda_init=0.0, lora_o=True), "output branch"),
        (dict(lambda_mode="fixed", lambda_init=0.1), "lambda = 0.1"),
    ],
)
def test_what_a_llama_layer_cannot_hold_is_named(fields, message):
    adapter = AdapterConfig(method="difflora", rank=2, alpha=4.0, **fields)
    model = nnx.eval_shape(  # shapes only: the refusal needs no weights
        lambda: apply_adapters(LlamaForCausalLM(SMALL_MODEL, rngs=nnx.Rngs(0)), adapter)
    )
    with pytest.raises(CheckpointError, match=message):
        merged_params(model)


def test_lora_folds_as_w_plus_s_a_b():
    """W + s A B per projection, in our kernel layout (o_proj's [heads, head_dim, embed])."""
    adapter = AdapterConfig(method="lora", rank=2, alpha=4.0, targets=("q", "o", "down"))
    model = nnx.eval_shape(
        lambda: apply_adapters(LlamaForCausalLM(SMALL_MODEL, rngs=nnx.Rngs(0)), adapter)
    )
    rng = np.random.default_rng(0)
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param):
            variable.set_value(jnp.asarray(rng.standard_normal(variable.shape), jnp.float32))
    randomize_adapters(model)
    merged = merged_params(model)
    o_proj = model.layers[1].attn.o_proj
    a, b = np.asarray(o_proj.lora.a[...]), np.asarray(o_proj.lora.b[...])
    expected = np.asarray(o_proj.kernel[...]) + 2.0 * np.einsum("hdr,re->hde", a, b)
    np.testing.assert_allclose(merged["layers.1.attn.o_proj.kernel"], expected, rtol=1e-6)
    np.testing.assert_array_equal(
        merged["layers.1.attn.k_proj.kernel"], np.asarray(model.layers[1].attn.k_proj.kernel[...])
    )
