"""The Hugging Face ``config.json`` mapping: every malformed field is a CheckpointError naming
it (never a raw TypeError), and writing a config.json reads back to the same model."""

import dataclasses
import json

import pytest

from difflora_jax.catalog import model_names, model_shape
from difflora_jax.cli import main
from difflora_jax.config import RopeScaling, to_dict
from difflora_jax.errors import CheckpointError, ConfigError
from difflora_jax.weights.hf_config import hf_llama_config, model_config_from_hf, read_hf_config

GOOD = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}


def _write(tmp_path, data) -> object:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(data))
    return directory


def test_the_good_config_reads():
    config = model_config_from_hf(GOOD)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.eos_token_ids == (2,)


@pytest.mark.parametrize(
    "data, named",
    [
        ([GOOD], "expected a JSON object, got list"),
        ("llama", "expected a JSON object, got str"),
        ({**GOOD, "hidden_size": "64"}, "'hidden_size' = '64'"),
        ({**GOOD, "num_attention_heads": 0}, "'num_attention_heads' = 0"),
        ({**GOOD, "num_attention_heads": 3}, "'num_attention_heads' = 3"),  # 64 % 3 != 0
        ({**GOOD, "num_key_value_heads": 0}, "'num_key_value_heads' = 0"),
        ({**GOOD, "num_key_value_heads": 3}, "'num_kv_heads' = 3"),  # does not divide 4
        ({**GOOD, "vocab_size": -1}, "'vocab_size' = -1"),
        ({**GOOD, "num_hidden_layers": 2.5}, "'num_hidden_layers' = 2.5"),
        ({**GOOD, "num_hidden_layers": True}, "'num_hidden_layers' = True"),
        ({**GOOD, "rms_norm_eps": "tiny"}, "'rms_norm_eps' = 'tiny'"),
        ({**GOOD, "rms_norm_eps": 0}, "'rms_norm_eps' = 0"),
        ({**GOOD, "rope_theta": None}, "'rope_theta' = None"),
        ({**GOOD, "rope_scaling": "llama3"}, "'rope_scaling' = 'llama3'"),
        ({**GOOD, "rope_scaling": [8.0]}, "'rope_scaling' = [8.0]"),
        ({**GOOD, "rope_parameters": 5}, "'rope_parameters' = 5"),
        (
            {**GOOD, "rope_scaling": {"rope_type": "llama3", "factor": "8"}},
            "'factor' = '8'",
        ),
        (
            {
                **GOOD,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0},
            },
            "high_freq_factor",
        ),
        ({**GOOD, "head_dim": "16"}, "'head_dim' = '16'"),
        ({**GOOD, "tie_word_embeddings": "yes"}, "'tie_word_embeddings' = 'yes'"),
        ({**GOOD, "eos_token_id": "</s>"}, "'eos_token_id' = '</s>'"),
        ({**GOOD, "eos_token_id": [2, "x"]}, "'eos_token_id' = [2, 'x']"),
        ({**GOOD, "bos_token_id": [1, 2]}, "'bos_token_id' = [1, 2]"),
        ({**GOOD, "max_position_embeddings": 0}, "'max_position_embeddings' = 0"),
        ({**GOOD, "architectures": "LlamaForCausalLM"}, "'architectures'"),
        ({k: v for k, v in GOOD.items() if k != "intermediate_size"}, "'intermediate_size'"),
    ],
)
def test_malformed_config_json_names_the_field(tmp_path, data, named):
    directory = _write(tmp_path, data)
    with pytest.raises(CheckpointError, match=r"config\.json") as error:
        read_hf_config(directory)
    assert named in str(error.value)
    assert isinstance(error.value.__cause__, ConfigError | type(None))


def test_info_prints_the_error_not_a_traceback(tmp_path, capsys):
    directory = _write(tmp_path, {**GOOD, "num_attention_heads": 0})
    assert main(["info", "--model", str(directory)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("difflora: error: ")
    assert "'num_attention_heads' = 0" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", model_names())
def test_written_config_json_reads_back_to_the_same_model(name):
    config = model_shape(name)
    hf = hf_llama_config(config)
    assert to_dict(model_config_from_hf(json.loads(json.dumps(hf)), name=name)) == to_dict(config)


def test_writing_refuses_what_config_json_cannot_express():
    config = model_shape("llama-3.2-1b")
    with_factors = dataclasses.replace(
        config, rope_scaling=None, rope_freq_factors=(1.0,) * (config.head_dim // 2)
    )
    with pytest.raises(CheckpointError, match="per-frequency RoPE factors"):
        hf_llama_config(with_factors)
    with pytest.raises(CheckpointError, match="invalid model config"):
        hf_llama_config(dataclasses.replace(config, num_kv_heads=7))


# ---------------------------------------------------------------------------------------------
# both the transformers 4 and 5 spellings of RoPE settings


def _hf(**extra):
    """GOOD without its RoPE settings, plus ``extra``."""
    return {**{k: v for k, v in GOOD.items() if k != "rope_theta"}, **extra}


def test_hf_rope_scaling_transformers4_style():
    config = model_config_from_hf(
        _hf(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    )
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert config.head_dim == 16  # hidden_size / heads when head_dim is absent
    legacy = model_config_from_hf(_hf(rope_scaling={"type": "linear", "factor": 4.0}))
    assert legacy.rope_scaling.rope_type == "linear" and legacy.rope_scaling.factor == 4.0


def test_hf_rope_parameters_transformers5_style():
    config = model_config_from_hf(
        _hf(rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    )
    assert config.rope_theta == 123456.0 and config.rope_scaling is None
    scaled = model_config_from_hf(
        _hf(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    )
    assert scaled.rope_theta == 5000.0
    assert scaled.rope_scaling.rope_type == "linear" and scaled.rope_scaling.factor == 2.0


def test_hf_unsupported_rope_type_is_named():
    with pytest.raises(ConfigError, match="'yarn'"):
        model_config_from_hf(_hf(rope_parameters={"rope_type": "yarn", "factor": 4.0}))
