"""Named methods, model-config reading without weights, and the `difflora params` command.

The expected counts are the paper's / reference code's numbers (arXiv:2507.23588), not
values produced by this code.
"""

import json

import pytest

from difflora_jax.catalog import PAPER_VARIANTS, load_method, method_names, model_names, model_shape
from difflora_jax.cli import main
from difflora_jax.config import AdapterConfig
from difflora_jax.errors import ConfigError
from difflora_jax.weights.loading import read_model_config

PAPER_COUNTS = {  # Llama-3.2-1B, per layer (16 layers)
    "lora-r8": 352_256,
    "difflora-64": 426_240,
    "difflora-32": 426_240,
    "difflora-32-gn": 426_304,
    "reference-quickstart": 426_048,
}


def test_every_paper_variant_has_a_yaml():
    assert set(PAPER_VARIANTS) <= set(method_names())
    for name in PAPER_VARIANTS:
        assert isinstance(load_method(name), AdapterConfig)


def test_paper_hyperparameters_in_the_method_files():
    assert (load_method("lora-r8").method, load_method("lora-r8").rank) == ("lora", 8)
    d64 = load_method("difflora-64")
    assert (d64.rank, d64.alpha, d64.positive_term, d64.lambda_mode) == (
        64,
        128.0,
        False,
        "learned",
    )
    fixed = load_method("difflora-64-fixed-lambda")
    assert (fixed.lambda_mode, fixed.lambda_init) == ("fixed", 0.1)
    d32 = load_method("difflora-32")
    assert (d32.rank, d32.alpha, d32.positive_term, d32.group_norm) == (32, 64.0, True, False)
    assert load_method("difflora-32-gn").group_norm
    assert load_method("difflora-identity").identity_start


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ConfigError, match="known methods"):
        load_method("difflora-999")


def test_params_command_prints_the_paper_counts(capsys):
    assert (
        main(
            [
                "params",
                "--model",
                "llama-3.2-1b",
                "--json",
                *[arg for m in PAPER_COUNTS for arg in ("--method", m)],
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["base_params"] == model_shape("llama-3.2-1b").num_params
    for row in report["methods"]:
        assert row["per_layer"] == [PAPER_COUNTS[row["method"]]] * 16
        assert row["total"] == 16 * PAPER_COUNTS[row["method"]]
    # the totals the paper prints
    totals = {r["method"]: r["total"] for r in report["methods"]}
    assert totals["lora-r8"] == 5_636_096 and totals["reference-quickstart"] == 6_816_768


def test_params_reads_a_real_checkpoint_config_without_weights():
    config = read_model_config("smollm2-135m-instruct")
    assert (config.num_layers, config.hidden_size, config.num_kv_heads) == (30, 576, 3)


def test_load_model_with_a_method_name_adds_fresh_adapters(tmp_path):
    from difflora_jax.modeling.adapters import DifferentialAttention, count_adapter_params
    from difflora_jax.weights.loading import load_model
    from tests.conftest import save_tiny_llama

    directory, _ = save_tiny_llama(tmp_path)
    model, _ = load_model(directory, adapter="difflora-32", with_tokenizer=False)
    assert model.adapter_config == load_method("difflora-32")
    assert all(isinstance(layer.attn, DifferentialAttention) for layer in model.layers)
    assert count_adapter_params(model) > 0
    with pytest.raises(ConfigError, match="known methods"):
        load_model(directory, adapter="no-such-method", with_tokenizer=False)


# Parameter counts the model cards publish (an independent check of every shipped shape).
PUBLISHED_PARAMS = {
    "smollm2-135m": 134_515_008,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "llama-2-7b": 6_738_415_616,
    # meta-llama/Llama-2-70b-hf: model.safetensors.index.json total_size 137,953,296,384 bytes
    # of float16
    "llama-2-70b": 68_976_648_192,
}


def test_every_shipped_shape_has_a_published_count():
    assert model_names() == sorted(PUBLISHED_PARAMS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_shipped_shapes_match_published_parameter_counts(name):
    config = model_shape(name)
    assert config.name == name
    assert config.num_params == PUBLISHED_PARAMS[name]
